from pathlib import Path


def test_report_write_rewrites_a_folder_s_tables_without_training(tmp_path):
    import shutil

    from harness.cli import main

    folder = tmp_path / "quickdraw40_4x10"
    source = Path("results/reference/quickdraw40_4x10")
    runs = {"naive", "finetune", "replay", "gmm"}  # a few of its rows: the figures of all 50 take ~45 s
    shutil.copytree(source, folder, ignore=lambda d, names: [n for n in names if Path(d) == source
                                                            and (source / n).is_dir() and n not in runs])
    for name in ("table.md", "table.csv", "report.html"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "plots", ignore_errors=True)
    assert main(["report", "--write", str(folder)]) == 0
    table = (folder / "table.md").read_text()
    assert "| naive |" in table and (folder / "table.csv").exists() and (folder / "report.html").exists()
    assert list((folder / "plots").glob("*.png"))
    assert main(["report", "--write", str(folder), str(tmp_path)]) == 2  # one folder only
