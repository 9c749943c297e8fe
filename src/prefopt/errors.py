"""The one error type users see: a plain message, exit code 2, no traceback unless --debug."""


class PrefoptError(Exception):
    """Bad input from the user (config, data, model path). The message says where and what."""
