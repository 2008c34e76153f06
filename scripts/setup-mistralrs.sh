#!/usr/bin/env bash
# Prepare integration/upstream-src/: pristine copies of the published mistral.rs
# crates that the integration crate patches, with integration/upstream/*.patch
# applied on top. Builds nothing. Re-running starts again from pristine copies.
#
#   scripts/setup-mistralrs.sh [--force]
#
# integration/Cargo.toml points [patch.crates-io] at the resulting directories.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.8.1
CRATES=(mistralrs-quant mistralrs-core)
PATCHES=integration/upstream
DEST=integration/upstream-src

# Already set up from these very patches: leave the tree (and its
# timestamps, which cargo's rebuild checks read) alone.
stamp=$(cat "$0" "$PATCHES"/*.patch 2>/dev/null | cksum | cut -d' ' -f1)
if [[ -f $DEST/.stamp && $(cat "$DEST/.stamp") == "$stamp" && ${1:-} != --force ]]; then
    echo "integration/upstream-src is up to date with integration/upstream (--force to redo)"
    exit 0
fi

# 1. Have cargo fetch the published crates through whatever registry and
#    source replacement it is configured with, then ask it where they are.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
{
    printf '[package]\nname = "fetch-mistralrs"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
    printf '[workspace]\n\n[dependencies]\n'
    for crate in "${CRATES[@]}"; do
        printf '%s = { version = "=%s", default-features = false }\n' "$crate" "$VERSION"
    done
} >"$tmp/Cargo.toml"
mkdir "$tmp/src"
: >"$tmp/src/lib.rs"
echo "Fetching ${CRATES[*]} $VERSION ..."
cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
metadata=$(cargo metadata --offline --format-version 1 --manifest-path "$tmp/Cargo.toml")

rm -rf "$DEST"
mkdir -p "$DEST"
for crate in "${CRATES[@]}"; do
    manifest=$(grep -o "\"manifest_path\":\"[^\"]*/$crate-$VERSION/Cargo\\.toml\"" <<<"$metadata" |
        head -n 1 | sed 's/^"manifest_path":"//; s/"$//')
    if [[ -z $manifest || ! -f $manifest ]]; then
        echo "error: cargo did not report a source directory for $crate $VERSION" >&2
        exit 1
    fi
    cp -R "$(dirname "$manifest")" "$DEST/$crate"
    chmod -R u+w "$DEST/$crate"
    # mistralrs-core's build script asks cargo to rerun it when `.git/HEAD`
    # of the crate changes; a published crate has none, and a missing file
    # counts as changed, so every cargo command rebuilt mistralrs-core
    # (minutes). A detached HEAD file stands in: git ignores a `.git` dir
    # without objects, so `git rev-parse` still finds the repository below.
    mkdir -p "$DEST/$crate/.git"
    echo "0000000000000000000000000000000000000000" >"$DEST/$crate/.git/HEAD"
    echo "Copied $crate $VERSION from $(dirname "$manifest")"
done

# A git repository holding the pristine state, so that after editing,
# `git diff --relative` inside $DEST/<crate> shows the changes to turn into a patch.
if command -v git >/dev/null; then
    git -C "$DEST" init --quiet
    git -C "$DEST" add --all
    git -C "$DEST" -c user.name=setup-mistralrs -c user.email=setup-mistralrs@localhost \
        -c commit.gpgsign=false commit --quiet --message "pristine ${CRATES[*]} $VERSION"
    echo "Committed the pristine copies in $DEST/.git"
fi

# 2. Apply integration/upstream/<crate>-NNNN-*.patch in order, strictly.
shopt -s nullglob
for crate in "${CRATES[@]}"; do
    patches=("$PATCHES/$crate"-*.patch)
    if ((${#patches[@]} == 0)); then
        echo "$crate: no patches, left pristine"
        continue
    fi
    for p in "${patches[@]}"; do
        if ! patch -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch --quiet \
            -d "$DEST/$crate" <"$p"; then
            echo "error: $p does not apply to $crate $VERSION" >&2
            exit 1
        fi
        echo "$crate: applied $(basename "$p")"
    done
done

echo "$stamp" >"$DEST/.stamp"

# 3. Report.
echo "Done: ${CRATES[*]} $VERSION with the patches above are in $DEST/"
