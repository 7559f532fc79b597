"""One GPU per worker process, tested with fake device lists (CI has no GPU): joblib workers each
hold their own GPU for all their jobs, ``gpus`` chooses which, a bad choice stops the sweep."""

from __future__ import annotations

import multiprocessing
import re

import pytest

from framework.errors import LayerprobeError
from framework.gpus import chosen_gpus, claim_gpu


def test_the_gpus_option_chooses_among_the_visible_ones():
    assert chosen_gpus(None, [0, 1, 2, 3]) == [0, 1, 2, 3]
    assert chosen_gpus(2, [0, 1, 2, 3]) == [0, 1]
    assert chosen_gpus([3, 1], [0, 1, 2, 3]) == [3, 1]
    for option, message in ((5, "gpus=5: 4 GPU(s) are visible"), (0, "use 1..4"), ([7], "GPU(s) [7] are not visible"),
                            (True, "give a number of GPUs"), ("foo", "gpus=foo: give a number of GPUs"),
                            (["a"], "gpus=['a']: give a number"), ([], "gpus=[]: give a number")):
        with pytest.raises(LayerprobeError, match=re.escape(message)):
            chosen_gpus(option, [0, 1, 2, 3])


def _claim(folder, queue, hold):
    queue.put(claim_gpu(folder, [0, 1]))
    hold.wait(30)


def test_live_workers_hold_distinct_gpus_and_a_gone_workers_gpu_is_free_again(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue, hold = context.Queue(), context.Event()
    workers = [context.Process(target=_claim, args=(str(tmp_path), queue, hold)) for _ in range(3)]
    for worker in workers:
        worker.start()
    claimed = sorted((queue.get(timeout=60) for _ in workers), key=lambda g: (g is None, g))
    assert claimed == [0, 1, None]  # the third finds both held: it shares (round robin by job)
    hold.set()
    for worker in workers:
        worker.join(30)
    late_queue, late_hold = context.Queue(), context.Event()
    late = context.Process(target=_claim, args=(str(tmp_path), late_queue, late_hold))
    late.start()
    assert late_queue.get(timeout=60) == 0  # the locks went with their processes
    late_hold.set()
    late.join(30)


def test_joblib_workers_each_keep_their_own_gpu(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "pooler=mean,max,last,cls",
                     "metric=spearman", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     env={"LAYERPROBE_VISIBLE_GPUS": "0,1"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    assert len(runs) == 4
    by_process: dict[str, set[str]] = {}
    for run in runs:
        by_process.setdefault(run.data.tags["layerprobe.process"], set()).add(run.data.tags["layerprobe.gpu"])
    assert all(len(gpus) == 1 for gpus in by_process.values())  # a worker keeps its GPU
    held = [next(iter(gpus)) for gpus in by_process.values()]
    assert len(held) == len(set(held)) and set(held) <= {"0", "1"}  # no two workers on one GPU
    assert runs[0].data.params["gpus"] == "null"  # the option as set; which GPU ran it is the tag


def test_a_malformed_gpus_option_is_one_line_also_on_a_machine_without_gpus(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli(f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "gpus=foo")
    assert result.returncode == 2, result.stderr[-3000:]
    assert any("gpus=foo: give a number of GPUs" in line for line in result.error_lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_gpus_choice_that_cannot_be_met_stops_the_sweep_at_its_first_job(run_cli, tiny_mrpc, tiny_vectors):
    result = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "pooler=mean,max", "gpus=3",
                     env={"LAYERPROBE_VISIBLE_GPUS": "0,1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert any("gpus=3: 2 GPU(s) are visible" in line for line in result.error_lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
