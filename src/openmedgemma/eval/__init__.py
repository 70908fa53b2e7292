"""openmedgemma.eval: the MedGemma report's evaluation protocol for any model.

    from openmedgemma.eval import get_task, list_tasks, run_task
    task = get_task("medqa", "shared/data")
    results = run_task(task, my_chat_model, out_dir="results", limit=100)

Models are anything implementing `ChatModel` (generation tasks) or `Embedder` (MedSigLIP tasks),
see `openmedgemma.eval.protocols`. Names are imported lazily so that `openmedgemma eval --help`
stays instant; nothing here imports torch.
"""

from openmedgemma.lazy import lazy_exports

_EXPORTS = {
    # the errors its functions raise, importable where they are called
    "OpenMedGemmaError": "openmedgemma.errors",
    "ConfigError": "openmedgemma.errors",
    "DataError": "openmedgemma.errors",
    "ChatModel": "openmedgemma.eval.protocols",
    "Embedder": "openmedgemma.eval.protocols",
    "result_paths": "openmedgemma.eval.runner",
    "run_task": "openmedgemma.eval.runner",
    "TASKS": "openmedgemma.eval.tasks",
    "Example": "openmedgemma.eval.tasks",
    "Task": "openmedgemma.eval.tasks",
    "get_task": "openmedgemma.eval.tasks",
    "list_tasks": "openmedgemma.eval.tasks",
    "register": "openmedgemma.eval.tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
