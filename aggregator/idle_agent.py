"""What a local Ray's raylet runs in place of its dashboard agent and runtime-env agent.

The raylet will not start without both agent commands, exits when either agent exits, and waits
for each agent to publish its ports in the session folder. A single-host instance that runs plain
tasks uses neither agent: no metrics are exported (the aggregator has its own), no runtime
environment is built (workers import the installed package), no job is submitted. Ray's own
agents cost about 140 MiB PSS between them; this one costs about 3. It publishes every port as
``-1``, which Ray reads as "service not in use" (what its minimal install's agent publishes for
metrics), then lives exactly as long as its raylet.

Run as a file with the standard library only (``python -S -I idle_agent.py ...``): importing the
package, or Ray, would cost the memory this saves.
"""

from __future__ import annotations

import os
import sys
import time

PORTS = {
    "dashboard": ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port"),
    "runtime-env": ("runtime_env_agent_port",),
}
POLL_SECONDS = 0.5


def publish_unused(session_dir: str, node_id: str, names: tuple[str, ...]) -> None:
    """Write ``-1`` to each port file the raylet waits for (the name Ray's ``persist_port`` uses:
    ``<port name>_<node id hex>``), atomically, so the raylet never reads half a number."""
    for name in names:
        path = os.path.join(session_dir, f"{name}_{node_id}")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write("-1")
        os.replace(tmp, path)


def main(argv: list[str]) -> int:
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    missing = [k for k in ("role", "session-dir", "node-id") if not opts.get(k)]
    if missing or opts.get("role") not in PORTS:
        print(f"idle_agent: need --role={'|'.join(PORTS)} --session-dir=... --node-id=...; "
              f"missing or wrong: {missing or ['role']}", file=sys.stderr)
        return 2
    publish_unused(opts["session-dir"], opts["node-id"], PORTS[opts["role"]])
    raylet = os.getppid()
    while os.getppid() == raylet:  # reparented: the raylet is gone, so is our purpose
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
