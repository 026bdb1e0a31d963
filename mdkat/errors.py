"""The one exception type that stages turn into a clean error message and a non-zero exit."""


class MdkatError(Exception):
    """An error caused by input, configuration or environment, with a message meant for the user."""
