"""The one error type for user mistakes: it names the field, the value and the fix."""


class ConfigError(ValueError):
    """A bad value supplied by the user. Entry points print it as one line and exit 2."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}: {value!r} is not valid; {fix}")

    def __reduce__(self):
        """Pickled whole, without calling ``__init__`` again (Ray carries a worker's error to the driver)."""
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type, args: tuple, state: dict) -> ConfigError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def require(condition: bool, field: str, value: object, fix: str) -> None:
    if not condition:
        raise ConfigError(field, value, fix)
