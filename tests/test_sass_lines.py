"""bench/sass_lines.py on a small listing and profile written here: the per-line sums, the
regions, and the refusals (two builds, an ambiguous name)."""

import importlib.util
from pathlib import Path

import pytest

_TOOL = Path(__file__).parents[1] / "bench/sass_lines.py"
_spec = importlib.util.spec_from_file_location("sass_lines", _TOOL)
sass_lines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_lines)

# Two instantiations; the bf16 one's first instruction comes before any location line of its own.
LISTING = """\
\t.text._ZN3din3cuk21din_tc_forward_kernelI6__halfEEvv:
\t//## File "/x/csrc/din_cuda_tc.cu", line 470
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t.text._ZN3din3cuk21din_tc_forward_kernelI13__nv_bfloat16EEvv:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "/x/csrc/din_cuda_tc.cu", line 10
        /*0010*/                   IMAD R2, R3, R4, R5 ;
        /*0020*/              @!P0 BRA 0x40 ;
\t//## File "/x/csrc/din_cuda_common.cuh", line 46
        /*0030*/                   MUFU.EX2 R6, R7 ;
"""

HEADER = '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"'
PROFILE = f"""\
"Kernel Name","void din::cuk::din_tc_forward_kernel<__half>(void)",
{HEADER}
"0x1","      LDC R1, c[0x0][0x28]","1","9"
"Kernel Name","void din::cuk::din_tc_forward_kernel<__nv_bfloat16>(void)",
{HEADER}
"0x1","      LDC R1, c[0x0][0x28]","5","100"
"0x2","      IMAD R2, R3, R4, R5","10","1,000"
"0x3","@!P0 BRA 0x40","5","900"
"0x4","      MUFU.EX2 R6, R7","80","8,000"
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "l.sass").write_text(LISTING)
    (tmp_path / "p.csv").write_text(PROFILE)
    return str(tmp_path / "l.sass"), str(tmp_path / "p.csv")


def test_lines_and_regions(files, capsys):
    sass_lines.main([*files, "din_tc_forward_kernelI13__nv_bfloat16",
                     "--regions", "din_cuda_tc.cu:1-99:index", "din_cuda_common:0-999:activation"])
    out = capsys.readouterr().out
    assert "10000 executed (warp level), 100 stall samples" in out
    rows = {line.rsplit(None, 2)[0]: line.split()[-2:] for line in out.splitlines()[2:] if line.strip()}
    assert rows["('din_cuda_common.cuh', 46)"] == ["80.0", "80.0"]
    assert rows["('din_cuda_tc.cu', 10)"] == ["19.0", "15.0"]  # IMAD and BRA; the half's line 470 not here
    assert rows["None"] == ["1.0", "5.0"]  # the function's first instruction has no location yet
    assert rows["index"] == ["19.0", "15.0"] and rows["activation"] == ["80.0", "80.0"]


def test_refuses_other_builds_and_ambiguous_names(files, tmp_path):
    with pytest.raises(SystemExit, match="names 2 functions"):
        sass_lines.main([*files, "din_tc_forward_kernel"])
    (tmp_path / "p.csv").write_text(PROFILE.replace("MUFU.EX2", "FMUL"))
    with pytest.raises(SystemExit, match="1 opcodes differ"):
        sass_lines.main([*files, "din_tc_forward_kernelI13__nv_bfloat16"])
    (tmp_path / "p.csv").write_text(PROFILE.rsplit('"0x4"', 1)[0])
    with pytest.raises(SystemExit, match="4 instructions in the listing, 3 profiled"):
        sass_lines.main([*files, "din_tc_forward_kernelI13__nv_bfloat16"])
