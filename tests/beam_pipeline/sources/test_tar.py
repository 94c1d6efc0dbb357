"""beam_pipeline.sources.tar: WebDataset-style tar shards as records; a broken shard keeps what came before."""
from __future__ import annotations

import io
import tarfile

from beam_pipeline.sources import tar
from beam_pipeline.sources.record import Record, RecordKeys
from tests.beam_pipeline.sources.shards import put


def _tar(path, members, mode="w") -> str:
    """Write a tar with `members` [(name, bytes)], in order; a name ending in '/' is a directory."""
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path)


def test_tar_members_labels_and_metadata(tmp_path):
    path = _tar(tmp_path / "shard-0.tar", [
        ("train/", b""),
        ("train/0001.jpg", b"J1"), ("train/0001.cls", b"3\n"), ("train/0001.json", b"{}"),
        ("train/0002.cls", b"5"), ("train/0002.png", b"P2"), ("train/0002.mask.png", b"M2"),
        ("0003.webp", b"W3"),
        ("README.txt", b"not an item"),
    ])
    got = list(tar.tar_shard_records(path, "shard-0.tar", RecordKeys(label="cls"), max_bytes=10))
    assert got == [
        Record("shard-0.tar#train/0001.jpg", f"{path}#train/0001.jpg", b"J1", "3"),
        Record("shard-0.tar#train/0002.png", f"{path}#train/0002.png", b"P2", "5"),
        Record("shard-0.tar#train/0002.mask.png", f"{path}#train/0002.mask.png", b"M2", "5"),
        Record("shard-0.tar#0003.webp", f"{path}#0003.webp", b"W3", None),
    ]
    assert tar.webdataset_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert tar.webdataset_key("0001") == ("0001", "")
    [too_big] = [r for r in tar.tar_shard_records(path, "s", max_bytes=1) if r.item_id == "s#0003.webp"]
    assert too_big.error == "OSError: member of 2 bytes exceeds --max_file_bytes=1"


def test_tar_gz_and_broken_tars(tmp_path):
    gz = _tar(tmp_path / "s.tar.gz", [("1.png", b"A"), ("2.png", b"B")], mode="w:gz")
    assert [r.data for r in tar.tar_shard_records(gz, "s.tar.gz")] == [b"A", b"B"]
    plain = open(_tar(tmp_path / "p.tar", [("1.png", b"A" * 600), ("2.png", b"B" * 600)]), "rb").read()
    (tmp_path / "cut.tar").write_bytes(plain[:1024 + 700])  # inside member 2's data
    got = list(tar.tar_shard_records(str(tmp_path / "cut.tar"), "cut.tar"))
    assert [r.item_id for r in got] == ["cut.tar#1.png", "cut.tar#rest@1"]
    assert got[1].error.endswith("the rest of the shard could not be read")
    # Cut exactly between members: no end-of-archive marker, so the tail is reported, not dropped.
    (tmp_path / "boundary.tar").write_bytes(plain[:1536])
    got = list(tar.tar_shard_records(str(tmp_path / "boundary.tar"), "b.tar"))
    assert [r.item_id for r in got] == ["b.tar#1.png", "b.tar#rest@1"]
    assert "without its end-of-archive marker" in got[1].error
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 30)
    [failure] = tar.tar_shard_records(str(tmp_path / "junk.tar"), "junk.tar")
    assert failure.item_id == "junk.tar" and failure.error.startswith("ReadError")


def test_tar_on_gcs(gcs_bucket):
    """A gs:// shard is read as a stream."""
    base = f"{gcs_bucket}/sources_test"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [("k1.png", b"P1"), ("k1.cls", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    put(f"{base}/s.tar", buffer.getvalue())
    assert list(tar.tar_shard_records(f"{base}/s.tar", "s.tar", RecordKeys(label="cls"))) == [
        Record("s.tar#k1.png", f"{base}/s.tar#k1.png", b"P1", "4")]
