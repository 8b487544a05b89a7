"""The ublk struct codecs against the installed kernel header, compiled with gcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vdisk.ublk import uapi

HEADER = Path("/usr/include/linux/ublk_cmd.h")

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not HEADER.exists(),
    reason="needs gcc and linux-libc-dev's linux/ublk_cmd.h",
)

FIELDS = {
    "ublksrv_ctrl_cmd": ["dev_id", "queue_id", "len", "addr", "data"],
    "ublksrv_ctrl_dev_info": [
        "nr_hw_queues", "queue_depth", "state", "max_io_buf_bytes", "dev_id", "ublksrv_pid",
        "flags", "ublksrv_flags",
    ],
    "ublksrv_io_desc": ["op_flags", "nr_sectors", "start_sector", "addr"],
    "ublksrv_io_cmd": ["q_id", "tag", "result", "addr"],
    "ublk_param_basic": [
        "attrs", "logical_bs_shift", "physical_bs_shift", "io_opt_shift", "io_min_shift",
        "max_sectors", "chunk_sectors", "dev_sectors", "virt_boundary_mask",
    ],
    "ublk_param_discard": [
        "discard_alignment", "discard_granularity", "max_discard_sectors",
        "max_write_zeroes_sectors", "max_discard_segments",
    ],
    "ublk_params": ["len", "types", "basic", "discard"],
}
OPTIONAL_BLOCKS = ["devt", "zoned", "dma", "seg"]
CONSTANTS = [
    "UBLK_CMD_GET_DEV_INFO", "UBLK_CMD_ADD_DEV", "UBLK_CMD_DEL_DEV", "UBLK_CMD_START_DEV",
    "UBLK_CMD_STOP_DEV", "UBLK_CMD_SET_PARAMS", "UBLK_CMD_GET_PARAMS",
    "UBLK_CMD_START_USER_RECOVERY", "UBLK_CMD_END_USER_RECOVERY", "UBLK_IO_FETCH_REQ",
    "UBLK_IO_COMMIT_AND_FETCH_REQ", "UBLK_IO_NEED_GET_DATA", "UBLK_IO_RES_ABORT",
    "UBLKSRV_IO_BUF_OFFSET", "UBLK_MAX_QUEUE_DEPTH", "UBLK_F_NEED_GET_DATA",
    "UBLK_F_USER_RECOVERY", "UBLK_F_USER_RECOVERY_REISSUE", "UBLK_IO_OP_READ",
    "UBLK_IO_OP_WRITE", "UBLK_IO_OP_FLUSH", "UBLK_IO_OP_DISCARD", "UBLK_IO_OP_WRITE_ZEROES",
    "UBLK_IO_F_FUA", "UBLK_IO_F_NOUNMAP", "UBLK_ATTR_READ_ONLY", "UBLK_ATTR_ROTATIONAL",
    "UBLK_ATTR_VOLATILE_CACHE", "UBLK_ATTR_FUA", "UBLK_PARAM_TYPE_BASIC",
    "UBLK_PARAM_TYPE_DISCARD", "UBLK_S_DEV_DEAD", "UBLK_S_DEV_LIVE", "UBLK_S_DEV_QUIESCED",
]


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    lines = []
    for struct_name, fields in FIELDS.items():
        lines.append(f'P("sizeof {struct_name}", sizeof(struct {struct_name}));')
        for f in fields:
            lines.append(
                f'P("{struct_name}.{f}", offsetof(struct {struct_name}, {f}));'
            )
    for block in OPTIONAL_BLOCKS:
        macro = {"devt": "DEVT", "zoned": "ZONED", "dma": "DMA_ALIGN", "seg": "SEGMENT"}[block]
        lines.append(
            f"#ifdef UBLK_PARAM_TYPE_{macro}\n"
            f'P("ublk_params.{block}", offsetof(struct ublk_params, {block}));\n'
            f'P("sizeof {block}", sizeof(((struct ublk_params *)0)->{block}));\n#endif'
        )
    for name in CONSTANTS:
        lines.append(f'P("{name}", (long long)({name}));')
    for nr in ["ADD_DEV", "DEL_DEV", "GET_DEV_INFO", "GET_PARAMS", "SET_PARAMS", "START_DEV"]:
        lines.append(
            f'P("U_CMD_{nr}", (long long)_IO{"R" if nr.startswith("GET") else "WR"}'
            f"('u', UBLK_CMD_{nr}, struct ublksrv_ctrl_cmd));"
        )
    lines.append("P(\"U_IO_FETCH_REQ\", (long long)_IOWR('u', UBLK_IO_FETCH_REQ, "
                 "struct ublksrv_io_cmd));")
    src = (
        "#include <stdio.h>\n#include <stddef.h>\n#include <errno.h>\n#include <linux/ioctl.h>\n"
        "#include <linux/ublk_cmd.h>\n"
        '#define P(n, v) printf("%s %lld\\n", n, (long long)(v))\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    d = tmp_path_factory.mktemp("uapi")
    (d / "t.c").write_text(src)
    subprocess.run(["gcc", "-o", str(d / "t"), str(d / "t.c")], check=True)
    out = subprocess.run([str(d / "t")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_struct_sizes(c_layout: dict[str, int]) -> None:
    assert c_layout["sizeof ublksrv_ctrl_cmd"] == uapi.CTRL_CMD.size == 32
    assert c_layout["sizeof ublksrv_ctrl_dev_info"] == uapi.DEV_INFO.size == 64
    assert c_layout["sizeof ublksrv_io_desc"] == uapi.IO_DESC.size == 24
    assert c_layout["sizeof ublksrv_io_cmd"] == uapi.IO_CMD.size == 16
    assert c_layout["sizeof ublk_param_basic"] == uapi.PARAM_BASIC.size
    assert c_layout["sizeof ublk_param_discard"] == uapi.PARAM_DISCARD.size


def _offsets(s: object) -> list[int]:
    """Byte offsets of each field of a struct.Struct format (no padding codes inside fields)."""
    import struct as st

    fmt = s.format  # type: ignore[attr-defined]
    offsets, pos = [], 0
    for count, code in __import__("re").findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        n = int(count or 1)
        if code == "x":
            pos += n
            continue
        size = st.calcsize("<" + code)
        for _ in range(n):
            offsets.append(pos)
            pos += size
    return offsets


@pytest.mark.parametrize(
    ("struct_name", "codec"),
    [
        ("ublksrv_ctrl_cmd", uapi.CTRL_CMD),
        ("ublksrv_ctrl_dev_info", uapi.DEV_INFO),
        ("ublksrv_io_desc", uapi.IO_DESC),
        ("ublksrv_io_cmd", uapi.IO_CMD),
        ("ublk_param_basic", uapi.PARAM_BASIC),
        ("ublk_param_discard", uapi.PARAM_DISCARD),
    ],
)
def test_field_offsets(c_layout: dict[str, int], struct_name: str, codec: object) -> None:
    ours = _offsets(codec)
    # our codec's field order follows the header; the named fields must sit where C puts them
    python_index = {
        "ublksrv_ctrl_cmd": [0, 1, 2, 3, 4],
        "ublksrv_ctrl_dev_info": [0, 1, 2, 4, 5, 6, 8, 9],
        "ublksrv_io_desc": [0, 1, 2, 3],
        "ublksrv_io_cmd": [0, 1, 2, 3],
        "ublk_param_basic": list(range(9)),
        "ublk_param_discard": list(range(5)),
    }[struct_name]
    for field, index in zip(FIELDS[struct_name], python_index):
        assert c_layout[f"{struct_name}.{field}"] == ours[index], field


def test_params_layout(c_layout: dict[str, int]) -> None:
    assert c_layout["ublk_params.basic"] == uapi.PARAMS_BASIC_OFFSET
    assert c_layout["ublk_params.discard"] == uapi.PARAMS_DISCARD_OFFSET
    known = {
        "devt": (uapi.PARAMS_DEVT_OFFSET, uapi.PARAM_DEVT.size),
        "zoned": (uapi.PARAMS_ZONED_OFFSET, uapi.PARAM_ZONED.size),
        "dma": (uapi.PARAMS_DMA_OFFSET, uapi.PARAM_DMA.size),
        "seg": (uapi.PARAMS_SEGMENT_OFFSET, uapi.PARAM_SEGMENT.size),
    }
    if "ublk_params.devt" not in c_layout:
        # A 6.1 header: the struct ends after discard; the newer blocks are checked against the
        # sizes the current header gives (devt 16, zoned 32, dma 8, segment 16).
        assert c_layout["sizeof ublk_params"] == uapi.PARAMS_SIZE_V1
        assert [size for _, size in known.values()] == [16, 32, 8, 16]
        assert uapi.PARAMS_SEGMENT_OFFSET % 8 == 0
        return
    for block, (offset, size) in known.items():
        assert c_layout[f"ublk_params.{block}"] == offset
        assert c_layout[f"sizeof {block}"] == size


def test_constants(c_layout: dict[str, int]) -> None:
    for name in CONSTANTS:
        assert getattr(uapi, name) == c_layout[name], name


def test_ioctl_encoding(c_layout: dict[str, int]) -> None:
    for nr in ["ADD_DEV", "DEL_DEV", "GET_DEV_INFO", "GET_PARAMS", "SET_PARAMS", "START_DEV"]:
        assert uapi.ioctl_encode_ctrl(getattr(uapi, f"UBLK_CMD_{nr}")) == c_layout[f"U_CMD_{nr}"]
    assert uapi.ioctl_encode_io(uapi.UBLK_IO_FETCH_REQ) == c_layout["U_IO_FETCH_REQ"]


def test_params_round_trip() -> None:
    p = uapi.Params(
        types=uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DISCARD,
        basic=uapi.ParamBasic(attrs=5, dev_sectors=12345, max_sectors=256),
        discard=uapi.ParamDiscard(max_discard_sectors=99, max_write_zeroes_sectors=77),
    )
    buf = p.pack()
    assert len(buf) == uapi.PARAMS_SIZE
    assert uapi.Params.unpack(buf) == p
    assert len(p.pack(uapi.PARAMS_SIZE_V1)) == 64
    info = uapi.DevInfo(nr_hw_queues=2, queue_depth=64, dev_id=7, flags=uapi.UBLK_F_USER_RECOVERY)
    assert uapi.DevInfo.unpack(info.pack()) == info
