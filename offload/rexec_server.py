"""rexec_server: the rexec daemon of either machine (`offload.rexec.server`).

The name is the reference's, and the one units and operators use; the
daemon itself, its agent, executor and links are the package `offload.rexec`
(ARCHITECTURE.md).
"""

from offload.rexec.server import main

if __name__ == "__main__":
    main()
