"""The Ray Data executor gives the same output as the local one (Ray started locally, 2 CPUs)."""

import pytest
from helpers.pipeline import counts, token_files, write_sources

from zamba2.pipeline import PipelineConfig, run
from helpers.synthetic import Generator

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # start-up is slow: once per module
    yield
    ray.shutdown()


def test_ray_matches_serial(local_ray, tmp_path):
    corpus = Generator(6).corpus(500, n_sources=3)
    sources = write_sources(corpus, tmp_path / "raw", bad_lines=1)
    common = {"source": sources, "shard_docs": 100, "stages": ["normalize", "filter", "dedup", "tokenize"],
              "dedup": {"preset": "zyda1", "mode": "cross-source-only"}}
    serial = run(PipelineConfig.from_dict(common | {"work": str(tmp_path / "sw"), "out": str(tmp_path / "s")}),
                 verbose=False)
    on_ray = run(PipelineConfig.from_dict(common | {"work": str(tmp_path / "rw"), "out": str(tmp_path / "r"),
                                                    "executor": "ray"}), verbose=False)
    assert token_files(tmp_path / "r") == token_files(tmp_path / "s") != {}
    assert counts(on_ray) == counts(serial)
    assert {k: v for k, v in on_ray["dedup"].items() if k != "seconds"} == \
        {k: v for k, v in serial["dedup"].items() if k != "seconds"}
