"""Start the kernel: ``python -m bai_compiled_kernel --language c -f CONNECTION_FILE``."""

from __future__ import annotations

import argparse
import sys

from .languages import LANGUAGE_CLASSES, get_language


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bai_compiled_kernel", add_help=False)
    parser.add_argument("--language", "-l", required=True, help=f"one of {', '.join(LANGUAGE_CLASSES)}")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    language = get_language(args.language)

    # Imported late: ipykernel takes a while to import, and --help should not wait for it.
    from ipykernel.kernelapp import IPKernelApp

    from .kernel import kernel_class

    # capture_fd_output: the programs' output goes through pipes we read ourselves; what the
    # kernel process itself writes to fd 1/2 (logs) belongs in the container log.
    IPKernelApp.launch_instance(argv=rest, kernel_class=kernel_class(language), capture_fd_output=False)


if __name__ == "__main__":
    main()
