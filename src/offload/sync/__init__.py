"""Two-way file sync of bind-mounted laptop directories into a session's mount area.

- `protocol`  framed messages over one byte stream (an SSH channel to `SYNC_CHANNEL_PATH`)
- `paths`     openat-style safe resolution inside a root (no `..`, no symlink ever followed)
- `ignore`    `.dockerignore` / `.offloadignore` with Docker's matching rules
- `scanner`   manifests of a tree (type, size, mtime, mode, link target; hashes on demand)
- `peer`      what both sides share: apply incoming changes, detect and send local ones
- `laptop`    the agent's side: initial push, then continuous two-way sync, status
- `remote`    the runner's endpoint: only inside the mount area, as its owner; conflicts aside
- `status`    the per-path status `offload status` shows
"""
