"""SSH tuning both ends of the tunnel share (the agent and the runner's endpoint).

Tuned against OpenSSH `-L` forwarding (bench/core_path.py): a 16 MiB window keeps a fast link
busy; 256 KiB packets cut the per-packet crypto and Python overhead; AES-GCM first because
OpenSSL's AES-NI path is the fastest of asyncssh's ciphers on x86; keepalives notice a dead
tunnel within 45 s.
"""

CHANNEL_WINDOW = 16 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 256 * 1024
ENCRYPTION_ALGS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
]
KEEPALIVE_INTERVAL_S = 15.0
KEEPALIVE_COUNT_MAX = 3
