"""The ``llama-offload`` console script: signal handling first, then the (slow) imports, then the command.

A Ctrl-C or SIGTERM while torch is still being imported ends the process with one line and 130/143, not
with a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

from llama_offload.files.cleanup import install_signal_handlers, interrupt_exit_code, interrupt_message  # no torch


def main() -> None:
    install_signal_handlers()  # SIGTERM raises like Ctrl-C from here on
    try:
        # Late, deliberately: cli.main imports torch (seconds), and a signal during that import must be handled.
        from llama_offload.cli.main import main as cli_main
    except KeyboardInterrupt as e:
        print(file=sys.stderr)
        print(interrupt_message(e, "llama-offload"), file=sys.stderr)
        sys.exit(interrupt_exit_code(e))
    cli_main()


if __name__ == "__main__":
    main()
