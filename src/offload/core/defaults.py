"""Default ports of a control plane: its settings and the laptop's `offload up` share them, and
the laptop's commands read them without loading the settings classes."""

DEFAULT_SERVER_PORT = 8421
DEFAULT_SSH_PORT = 8422
