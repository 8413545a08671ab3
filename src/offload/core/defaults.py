"""Default ports of a control plane: its settings and the laptop's `offload up` share them, and
the laptop's commands read them without loading the settings classes."""

DEFAULT_SERVER_PORT = 8421
DEFAULT_SSH_PORT = 8422
# The MTU of a sandbox's link to its network helper (the runner's tap0) and of the engine's
# bridge networks: at docker's 1500 a container downloads at a fraction of the speed, pasta
# moving one 1500-byte frame per write (bench/sandbox.py: 0.05x of the host against 0.54x).
SANDBOX_MTU = 65520
