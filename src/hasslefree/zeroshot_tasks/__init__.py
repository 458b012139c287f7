"""lm-eval task definitions of the papers' eight zero-shot tasks on local files.

One YAML per task (piqa, arc_easy, arc_challenge, winogrande, rte, openbookqa, boolq,
hellaswag), under lm-eval's standard names and with the standard tasks' prompts, choices,
targets and metrics; ``utils.py`` turns the local records into the hub datasets' layout. The
strings in each YAML's ``dataset_kwargs`` are file paths relative to the zero-shot data folder
(``shared/data/zeroshot``); :func:`hasslefree.zeroshot_files.local_task_folder` writes, per data
folder, one YAML per task that includes these with the paths made absolute, which is the folder
lm-eval's TaskManager is given. This package imports nothing itself.
"""

from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent
