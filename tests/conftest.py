import os

# Keep tests single-process friendly on a 2-core machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI turns on jax's persistent compilation cache (hfjax.compile_cache); tests that call
# it must not write into the user's ~/.cache nor change jax's config mid-suite.
os.environ.setdefault("HFJAX_COMPILATION_CACHE", "off")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: one pytest process runs ~800
    tests, and the executables it would otherwise keep alive add up (a late XLA compile
    crashed once in a full run on this 2-core machine while they accumulated)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """``tiny_zoo(n_replay=8, modules=QV, target_modules=QKV)``: one
    `hfjax.testing.zoo.build_zoo` per argument set for the whole session (building one takes
    ~10 s). Tests read it, never write into it. The default (q/v sources, a q/k/v target, 8
    replay examples a file) is the cheapest to fuse: two fusion groups, and k_proj stays
    unfused. Pass ``modules=None, target_modules=None`` for the full zoo."""
    from hfjax.testing.zoo import QKV, QV, build_zoo

    zoos: dict[tuple, dict] = {}

    def get(n_replay: int = 8, modules: tuple[str, ...] | None = QV,
            target_modules: tuple[str, ...] | None = QKV) -> dict:
        key = (n_replay, modules, target_modules)
        if key not in zoos:
            zoos[key] = build_zoo(tmp_path_factory.mktemp("zoo"), n_replay=n_replay,
                                  modules=modules, target_modules=target_modules)
        return dict(zoos[key])  # a copy: tests may add their own entries

    return get
