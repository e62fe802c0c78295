"""--engine torchrec without a usable torchrec: a one-line error and exit status 2 (runs everywhere)."""

import sys

from din_fused import train as T


def test_engine_torchrec_without_torchrec_exits_2_naming_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # makes "import torchrec" raise ImportError
    monkeypatch.delitem(sys.modules, "din_fused.torchrec_din", raising=False)
    out = tmp_path / "m.json"
    code = T.main(["--engine", "torchrec", "--no-progress", "--metrics-out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs torchrec" in err and "docs/torchrec.md" in err
    assert not out.exists()
