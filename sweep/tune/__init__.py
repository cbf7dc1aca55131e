"""`gradinv tune`: the tune section, Optuna's side, the candidate driver, the held-out report."""
