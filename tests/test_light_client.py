"""A notebook attached to a remote server needs no MLX: the client, the parameter checks, the widgets
and the magics run in a process where `import mlx` fails (an import hook makes MLX and mlx-lm absent)."""

import subprocess
import sys
import textwrap

CLIENT = textwrap.dedent("""
    import sys

    class NoMLX:  # as if MLX and mlx-lm were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("mlx", "mlx_lm"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoMLX())
    try:
        import mlx.core
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("the hook does not hide MLX")

    import mtpnb
    import mtpnb.magics  # the %mtp magics load
    from mtpnb.widgets import Comparison, Generation, Playground, TokenStream

    model = mtpnb.connect(sys.argv[1])
    result = model.generate("hello", depth=2, max_tokens=6)
    assert result.metrics.generated_tokens == 6, result
    try:
        model.generate("hello", temperature=float("nan"))
    except mtpnb.MTPNBError as e:
        assert str(e) == "temperature must be a finite number, not nan", e
    else:
        raise AssertionError("NaN accepted")

    generation = Generation(model, "hello", {"depth": 2, "max_tokens": 6}, [TokenStream()]).start()
    assert generation.wait(120).tokens == result.tokens and generation.status == "done"
    stopped = Generation(model, "hello", {"max_tokens": 4000, "temperature": 0.8}, [TokenStream()]).start()
    stopped.stop()
    stopped.wait(120)
    assert stopped.status == "cancelled", stopped.status
    comparison = Comparison(model)
    comparison.run("hello", depth=2, max_tokens=6)
    assert comparison.wait(120) is not None and comparison.speedup["same_output"]
    Playground(model)

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
    assert not loaded, loaded
    print("ok")
""")


def test_remote_client_and_widgets_work_without_mlx(checkpoints):
    from mtpnb.server import Server

    with Server(checkpoints(), port=0) as server:  # this process has MLX: it serves
        proc = subprocess.run([sys.executable, "-c", CLIENT, server.url], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
