"""`import orion_fsm` stays cheap: the heavy third-party modules load where they are used."""

from __future__ import annotations

import json
import subprocess
import sys

# Each costs milliseconds to import and is needed only once a registry is validated, a model
# loaded, a cache opened or memory sampled, never by `import orion_fsm` itself.
DEFERRED = ("jsonschema", "psutil", "diskcache", "sqlite3", "tokenizers", "numpy",
            "opentelemetry.sdk")


def test_importing_the_package_loads_none_of_the_deferred_modules() -> None:
    code = ("import json, sys, orion_fsm; "
            f"print(json.dumps([m for m in {DEFERRED!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout) == []
