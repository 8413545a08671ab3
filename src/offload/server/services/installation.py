"""What every replica of one installation must share, checked at start.

Runners trust one session CA (they learn its public key at registration).  Replicas sign
session certificates with the key in their own data directory, so a replica started with
another key would hand out certificates every runner refuses: it must not start.  The first
replica records the CA's public key in the database; every later one compares.
"""

from __future__ import annotations

from sqlalchemy.orm import Session as Db

from offload.core.errors import OffloadError
from offload.server.db.engine import insert_for
from offload.server.db.models import InstallationFact
from offload.server.services.ca import key_fingerprint

SESSION_CA = "session_ca_public_key"


def claim_session_ca(db: Db, public_key_line: str, key_path: str) -> None:
    """Record the CA key if none is recorded; OffloadError if another one is."""
    db.execute(
        insert_for(db)(InstallationFact)
        .values(key=SESSION_CA, value=public_key_line)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    recorded = db.get_one(InstallationFact, SESSION_CA).value
    if recorded.split()[:2] == public_key_line.split()[:2]:
        return
    mine, theirs = key_fingerprint(public_key_line), key_fingerprint(recorded)
    raise OffloadError(
        f"This control plane's session CA key ({key_path}, {mine}) is not the one of the "
        f"other replicas on this database ({theirs}): runners would refuse every certificate "
        "it signs.",
        f"Give every replica the same key: copy {key_path} from a running replica's data "
        "directory (mode 0600), or mount the same secret there, then start it again.",
    )
