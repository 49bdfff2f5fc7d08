"""What the nodes' schemas share: their category; for the training nodes the appended
``memory`` and ``overwrite`` inputs, the seed, and the node output made from a finished run."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .. import methods
from ..core import loss_plot
from ..host import compat, written_files
from ..host.training_run import TrainingResult
from ..training import memory as memory_settings
from ..training.job import TrainingJob

CATEGORY = "B-LoRA"
PACK_SEARCH_NAMES = ("B-LoRA", "blora", "content style", "style transfer", "lora")
"""What every node of the pack is found by in the node search (its name, what it is for)."""


def discovery(node_id: str, *words: str) -> dict:
    """The schema fields that make a node found by search, where the host has them: the pack's
    names, its methods' titles (the registry's), and ``words`` a user would type for this node.
    No ``essentials_category``: for a custom node it moves the node out of the node library's
    Extensions section and the search's Custom filter, and 0.33's Essentials tab lists a fixed
    set of core nodes only (frontend 1.49.6 ``essentialsNodes.ts``), so the node would be harder
    to find."""
    titles = [m.title for m in methods.METHODS if node_id in m.nodes]
    return compat.schema_discovery(search_aliases=list(dict.fromkeys([*PACK_SEARCH_NAMES, *titles, *words])))


def memory_input(node_id: str) -> io.Combo.Input:
    """The ``memory`` input, its tooltip saying what ``fastest`` keeps for the node's method."""
    recomputes = max(method.fastest_recomputes for method in methods.trained_by(node_id))
    fastest = ("everything kept for backward" if not recomputes else
               f"everything kept for backward; on a GPU that cannot hold it all, the first {recomputes} single blocks "
               "are recomputed, so that 1024 px fits a 24 GB card")
    smallest = "for 1024 px on an 8 GB card" if not recomputes else "for 1024 px on a 16 GB card with fp8 weights"
    return io.Combo.Input("memory", options=list(memory_settings.SETTINGS), default=memory_settings.AUTO, optional=True,
                          tooltip="auto: the fastest setting that fits the free VRAM at start (the status text says "
                                  f"which), moving on to 8 GB if the GPU runs out of memory anyway. fastest: {fastest}. "
                                  "8 GB: gradient checkpointing of the layers backward runs through (recomputed, about "
                                  f"one more partial forward per step), {smallest}.")


def overwrite_input() -> io.Boolean.Input:
    return io.Boolean.Input("overwrite", default=False, optional=True,
                            tooltip="Replace a finished LoRA of the same name. Off: the new file gets the next free "
                                    "name (name_2, name_3, ...), as ComfyUI's savers number theirs; the lora_name "
                                    "output and the status say which.")


def resume_input() -> io.Boolean.Input:
    return io.Boolean.Input("resume", default=False, optional=True,
                            tooltip="Continue from this lora_name's checkpoint (same settings) instead of starting over.")


def preview_input(trained: str, model_part: str) -> io.Int.Input:
    """``preview_every``: ``trained`` names what is trained ("LoRA"), ``model_part`` what runs ("UNet")."""
    return io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                        tooltip=f"Every N steps, show a quick sample of the {trained} being trained on this node "
                                f"(0: off). Costs a few {model_part} passes each time.")


def seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=compat.fixed_seed_control(),
                        tooltip="Seeds the LoRA init, timesteps and noise. A resume continues with its checkpoint's "
                                "seed, whatever this says.")


class TrainingNode(io.ComfyNode):
    """What the training nodes share beyond their schema: each sets ``NODE_ID``; ComfyUI's cache
    lets the node run again when a file it wrote is gone (a deleted LoRA is trained anew)."""

    NODE_ID = ""

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = "", **_) -> tuple:
        return written_files.fingerprint(cls.NODE_ID, lora_name)


def role_file_outputs(roles: tuple[str, ...]) -> list[io.String.Output]:
    """One output per trained role (``content_lora``, ``style_lora``): the files of a method that
    trains a LoRA per role (UnZipLoRA, SplitFlux)."""
    return [io.String.Output(display_name=f"{role}_lora", tooltip=f"The saved {role} LoRA, relative to the loras folder.")
            for role in roles]


def training_schema(node_id: str, display_name: str, description: str, inputs: list, model_tooltip: str,
                    file_outputs: list, **more) -> io.Schema:
    """A training node's schema: its ``inputs`` with ``memory`` and ``overwrite`` appended (last,
    so saved workflows keep their widget order); outputs the model, ``file_outputs`` (the written
    files' names), the loss curve and the losses; an output node (it writes files)."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
        inputs=[*inputs, memory_input(node_id), overwrite_input()],
        outputs=[io.Model.Output(display_name="model", tooltip=model_tooltip), *file_outputs,
                 io.Image.Output(display_name="loss_curve", tooltip="Per-step loss with a smoothed line."),
                 io.LossMap.Output(display_name="loss", tooltip="Per-step losses ({'loss': [...]}).")],
        hidden=[io.Hidden.unique_id], is_output_node=True, **more)


WRITTEN_UI_KEY = "blora_files"
"""The UI output listing the LoRA files a training node wrote (what the command line prints)."""


def training_output(node_id: str, lora_name: str, job: TrainingJob, result: TrainingResult, model) -> io.NodeOutput:
    """``(model, *the written files' names, loss curve, losses)`` with the status line."""
    written_files.record(node_id, lora_name, result.written)
    names = [job.files.relative(path) for path in result.written]
    losses = result.state.losses
    shown = {**ui.PreviewText(result.status).as_dict(), WRITTEN_UI_KEY: [str(path) for path in result.written]}
    return io.NodeOutput(model, *names, loss_plot.loss_curve_image(losses), {"loss": losses}, ui=shown)
