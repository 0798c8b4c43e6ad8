"""model_updater: polls the signed model repository (TUF) and installs newer models for the estimator's hot reload.

Every ``period`` seconds (node clock) one poll of
:class:`bms_ai.fleet.updater.ModelUpdater` runs on a worker thread, so
network waits never hold up the executor other nodes of the same process
share. Its result is the ``model_updater: updates`` diagnostic (counts, last
reason, installed versions). Every decision lives in the library.
"""

from __future__ import annotations

import threading
from typing import Any

from rclpy.node import Node

from bms_ai.core.levels import OK
from bms_ai.fleet.updater import CHECK, ModelUpdater
from bms_ai.models.runtime import default_model_dir
from bms_ai.nodes.common import Diagnostics, declare, spin_node


class ModelUpdaterNode(Node):
    """Timer -> one TUF poll on a worker thread; /diagnostics with the updater's status."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "model_updater"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "repo_url": declare(self, "repo_url", "", "model repository base URL (serves metadata/ and targets/); "
                                "'' = no updates"),
            "trusted_root": declare(self, "trusted_root", "", "file with the repository's root metadata shipped "
                                    "with the vehicle (its trust anchor)"),
            "model_dir": declare(self, "model_dir", "", "directory the estimator reads ('' = shipped models)"),
            "metadata_dir": declare(self, "metadata_dir", "", "TUF metadata cache, kept across restarts "
                                    "('' = <model_dir>/.tuf)"),
            "chemistry": declare(self, "chemistry", "", "install models of this chemistry only ('' = all)"),
            "period": declare(self, "period", 60.0, "seconds between polls of the repository (node clock)"),
        }
        model_dir = self.p["model_dir"] or str(default_model_dir())
        self.updater = ModelUpdater(
            self.p["repo_url"], self.p["trusted_root"], model_dir,
            self.p["metadata_dir"] or f"{model_dir}/.tuf",
            chemistries=(self.p["chemistry"],) if self.p["chemistry"] else ())
        self.diag = Diagnostics(self, self.p["pack_id"])
        self._worker: threading.Thread | None = None
        self._closing = False
        if self.p["repo_url"]:
            self.create_timer(float(self.p["period"]), self._poll)
            self._poll()
        self.create_timer(1.0, self._update_diagnostics)
        self._update_diagnostics()

    @property
    def polls(self) -> int:
        """Polls finished so far (apps and tests wait on it)."""
        return self.updater.polls

    def _poll(self) -> None:
        if self._closing or (self._worker is not None and self._worker.is_alive()):
            return  # the previous poll is still waiting for the server
        self._worker = threading.Thread(target=self._run_poll, name="model_updater-poll", daemon=True)
        self._worker.start()

    def _run_poll(self) -> None:
        result = self.updater.poll()
        for label in result.installed:
            self.get_logger().info(f"installed {label}")
        for kind, reason in result.rejections:
            self.get_logger().warning(f"rejected ({kind}): {reason}")

    def _update_diagnostics(self) -> None:
        if not self.p["repo_url"]:
            self.diag.update(CHECK, OK, "disabled: no repo_url", {"repo_url": ""})
            return
        st = self.updater.status()
        self.diag.update(st.check, st.level, st.message, st.values)

    def destroy_node(self) -> None:
        """Let a running poll finish (bounded by the HTTP timeout) before the node goes."""
        self._closing = True
        if self._worker is not None:
            self._worker.join(timeout=self.updater.timeout_s + 5)
        super().destroy_node()


NODE_CLASS = ModelUpdaterNode


def main(args: list[str] | None = None) -> None:
    """Console entry point of the model_updater node."""
    spin_node(ModelUpdaterNode, args)


if __name__ == "__main__":
    main()
