#!/usr/bin/env bash
# Builds pasta (passt) from Debian 13's source into $PREFIX/bin (default /usr/local/bin), which
# comes before /usr/bin on the sandboxes' PATH.
#
# Why: Debian 12's pasta (0.0~git20230309) never tells the guest that a connection was refused:
# a container's connect() to a closed port, or to an address the egress rules refuse, hangs
# until its own timeout instead of failing at once (measured; the build below answers with a
# reset, as a local engine's containers get). Debian 13's source builds on Debian 12 with
# nothing but gcc, make and libc: the tarball is pinned by its SHA-256 from Debian's own index.
#
# Idempotent: nothing is done when $PREFIX/bin/pasta already is this version (read from the
# binary: `pasta --version` exits without flushing stdout when it is not a terminal).
# Environment: PREFIX (default /usr/local), PASST_URL (a mirror of the tarball below).
set -euo pipefail

VERSION=2025_05_03.587980c
TARBALL=passt_0.0~git20250503.587980c.orig.tar.xz
SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
URL=${PASST_URL:-http://deb.debian.org/debian/pool/main/p/passt/$TARBALL}
PREFIX=${PREFIX:-/usr/local}

if [ -x "$PREFIX/bin/pasta" ] && grep -qaF "$VERSION" "$PREFIX/bin/pasta"; then
  echo "pasta $VERSION is already in $PREFIX/bin"
  exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/offload-pasta.XXXXXX")
trap 'rm -rf "$work"' EXIT
curl -fsSL --retry 3 -o "$work/$TARBALL" "$URL"
echo "$SHA256  $work/$TARBALL" | sha256sum --check --status ||
  { echo "build_pasta.sh: $URL does not have the expected SHA-256 $SHA256" >&2; exit 1; }
tar -C "$work" -xJf "$work/$TARBALL"
make -C "$work/passt-$VERSION" -j"$(nproc)" VERSION="$VERSION" passt passt.avx2 pasta pasta.avx2
install -d "$PREFIX/bin"
install -m 0755 "$work/passt-$VERSION/passt" "$work/passt-$VERSION/passt.avx2" "$PREFIX/bin/"
ln -sf passt "$PREFIX/bin/pasta"
ln -sf passt.avx2 "$PREFIX/bin/pasta.avx2"
echo "pasta $VERSION installed in $PREFIX/bin"
