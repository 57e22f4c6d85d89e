import os

from pipeline.engine.placement import _split, place_engines
from tests.conftest import job_config


def test_split_is_proportional_and_gives_every_pool_a_core():
    assert _split(2, [1, 1]) == [1, 1]
    assert _split(8, [3, 1]) == [6, 2]
    assert _split(3, [1, 10]) == [1, 2]
    assert sum(_split(7, [2, 3])) == 7


def test_engine_pools_get_disjoint_cores_on_one_machine():
    placements = place_engines(job_config())
    prefill, decode = placements["prefill"], placements["decode"]
    assert set(prefill.cores).isdisjoint(decode.cores)
    assert set(prefill.cores) | set(decode.cores) == os.sched_getaffinity(0)


def test_no_binding_on_gpus_or_a_remote_cluster():
    assert place_engines(job_config("engine.device=cuda"))["prefill"].cores is None
    assert place_engines(job_config("cluster=existing", "cluster.address=ray://head:10001"))["decode"].cores is None


def test_the_local_multi_node_cluster_binds_cores_like_one_machine():
    placements = place_engines(job_config("cluster=local-hetero"))
    assert set(placements["prefill"].cores).isdisjoint(placements["decode"].cores)
