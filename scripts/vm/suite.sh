# scripts/vm/suite.sh - the command line the VM suite scripts (scripts/vm-*-suite.sh)
# share. Sourced by each of them after it has defined `usage`, `prepare DIR`,
# `run DIR [VMOPTS...]` and, if it has one, `layout`; defines functions only.

# SCRIPT prepare DIR | SCRIPT run DIR [VMOPTS...] | SCRIPT layout (where defined).
suite_main() {
    local dir
    case ${1:-} in
        prepare)
            (($# == 2)) || usage
            prepare "$2"
            ;;
        run)
            (($# >= 2)) || usage
            dir=$2
            shift 2
            run "$dir" "$@"
            ;;
        layout)
            (($# == 1)) && declare -F layout >/dev/null || usage
            layout
            ;;
        *) usage ;;
    esac
}
