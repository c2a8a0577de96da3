"""validate_files refuses, in one line, what is not a finished real Downpour run."""

import h5py
import pytest

from mpibelief.simulate import validate_files


def result(path, **attrs):
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
    return path


@pytest.mark.parametrize(("attrs", "said"), [
    ({"simulated": True, "status": "complete"}, "is a simulated run"),
    ({"status": "failed: rank 2 died"}, "did not complete"),
])
def test_what_is_not_a_finished_real_run_is_one_line(tmp_path, capsys, attrs, said):
    path = result(tmp_path / "r.h5", **attrs)
    code = validate_files.main([str(path), "--calibration", str(tmp_path / "cal.h5"),
                                "--out", str(tmp_path / "v.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and said in err[0], err
    assert not (tmp_path / "v.h5").exists()


def test_an_unreadable_file_is_one_line(tmp_path, capsys):
    (tmp_path / "r.h5").write_text("not HDF5")
    code = validate_files.main([str(tmp_path / "r.h5"), "--calibration", "x.h5",
                                "--out", str(tmp_path / "v.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a readable result file" in err[0]
