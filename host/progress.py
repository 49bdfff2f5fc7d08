"""Training progress for the user: the host's progress bar (which also honours Cancel), a
console bar with it/s, a status line on the node, and one ``blora.train`` event per step for
the front end's live loss chart."""

from __future__ import annotations

import logging

import comfy.utils
from tqdm import tqdm

EVENT = "blora.train"


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


class TrainingProgress:
    def __init__(self, label: str, total: int, node_id: str | None, start: int = 0, note: str = ""):
        """``note``: shown after each step's figures in the status text (e.g. the memory setting)."""
        self.total = total
        self.note = f" · {note}" if note else ""
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.bar.update_absolute(start, total)
        self.console = tqdm(total=total, initial=start, desc=label, unit="step")
        self.seconds_per_step = None

    def on_step(self, step: int, total: int, loss: float, seconds: float, preview=None) -> None:
        """``preview``: a PIL image shown on the node (the host's preview channel)."""
        self.seconds_per_step = seconds if self.seconds_per_step is None else 0.9 * self.seconds_per_step + 0.1 * seconds
        remaining = (total - step) * self.seconds_per_step
        self.bar.update_absolute(step, total, ("JPEG", preview, 512) if preview is not None else None)
        self.console.update(1)
        self.console.set_postfix(loss=f"{loss:.4f}")
        if step == total:
            self.console.close()
        server = _server()
        if server is None:
            return
        payload = {"node": self.node_id, "step": step, "total": total, "loss": loss,
                   "it_per_s": 1.0 / self.seconds_per_step if self.seconds_per_step else None,
                   "seconds_left": remaining}
        try:
            server.send_sync(EVENT, payload, server.client_id)
            if self.node_id is not None:
                server.send_progress_text(
                    f"step {step}/{total} · {payload['it_per_s']:.2f} it/s · loss {loss:.4f} · {remaining:.0f} s left"
                    + self.note,
                    self.node_id,
                )
        except Exception as error:  # the UI is a convenience; training must not stop for it
            logging.debug("%s: progress event not sent: %s", self.console.desc, error)

    def say(self, text: str) -> None:
        """A status line for the user: on the node (when a server runs it) and in the log."""
        logging.warning("%s: %s", self.console.desc, text)
        self.console.close()
        server = _server()
        if server is None or self.node_id is None:
            return
        try:
            server.send_progress_text(text, self.node_id)
        except Exception as error:
            logging.debug("%s: status not sent: %s", self.console.desc, error)
