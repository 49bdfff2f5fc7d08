"""Running API-format prompts with ComfyUI's own executor, in this process, with console output."""

from __future__ import annotations

import asyncio
import uuid


class CommandLineError(RuntimeError):
    """A clear message for the user; the command line prints it and exits with status 2."""


class ConsoleServer:
    """What ComfyUI's ``PromptExecutor`` reports to (the web server, in a normal run). Nothing to
    forward here: progress shows as the nodes' own console bars, errors are read back from the
    executor's status messages."""

    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def node_definitions(nodes_module) -> dict:
    """``/object_info`` without a server: input specs, their order and the outputs of every node."""
    definitions = {}
    for name, node_class in nodes_module.NODE_CLASS_MAPPINGS.items():
        if hasattr(node_class, "GET_NODE_INFO_V1"):
            definitions[name] = node_class.GET_NODE_INFO_V1()
            continue
        inputs = node_class.INPUT_TYPES()
        definitions[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                             "output": list(node_class.RETURN_TYPES),
                             "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES))}
    return definitions


def run_prompt(prompt: dict) -> dict:
    """Validate and execute ``prompt``; returns the outputs of its output nodes by node id."""
    import execution
    import nodes

    from . import workflow_format
    from ..host import compat

    workflow_format.fill_defaults(prompt, node_definitions(nodes))
    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid or node_errors:
        details = "; ".join(f"node {node} ({prompt[node]['class_type']}): "
                            + ", ".join(f"{e['message']} {e.get('details', '')}".strip() for e in info["errors"])
                            for node, info in (node_errors or {}).items())
        raise CommandLineError(f"The graph is not valid: {details or error['message']}")
    executor = compat.prompt_executor(ConsoleServer())
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        failures = [data for event, data in executor.status_messages
                    if event in ("execution_error", "execution_interrupted")]
        failure = failures[-1] if failures else {}
        if "exception_message" in failure:
            raise CommandLineError(f"{failure.get('node_type', 'a node')} failed: {failure['exception_message'].strip()}")
        raise CommandLineError("Interrupted." if failure else "The graph failed; see the log above.")
    return executor.history_result["outputs"]
