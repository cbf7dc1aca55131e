"""Test support: a multi-node Ray cluster from real `ray start` processes."""
