# shellcheck shell=bash
# Sourced by make_gpu_bundle.sh, prebuild_gpu_wheel.sh and gpu_check.sh (issue 9): what
# identifies a GPU bundle, and the bytes a device call carries.

# bundle_id FILE: the sdist and patch lines of a MANIFEST.txt or a prebuilt KEY, sorted; a
# prebuilt package belongs to a bundle when the two are equal
bundle_id() { grep -E '^(sdist|patch) ' "$1" | sort; }

# tree_bytes: what the device tool sends of the checkout (tracked and untracked-not-ignored
# files); dir_bytes DIR: the files under DIR (a carried path); mib BYTES: "12.3 MiB"
tree_bytes() {
    git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'
}
dir_bytes() { find "$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
