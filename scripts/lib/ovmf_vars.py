#!/usr/bin/env python3
"""Lists the live Boot#### entries of an OVMF variable store (a copy of
OVMF_VARS*.fd after the VM ran), one per line, tab-separated:
name, description, partition GUID of its HD() node (or -), file path (or -).

The store is log-structured: a replaced or removed variable stays in the
flash with its State byte cleared until the firmware reclaims space, so a
plain byte search finds removed entries too. Only variables whose State is
VAR_ADDED (0x3F), or VAR_ADDED while in deleted transition (0x3E), are
live. Layout (EDK2): firmware volume header (HeaderLength at 0x30), the
28-byte variable store header, then authenticated variable headers (60
bytes: StartId 0x55AA, State, Reserved, Attributes, MonotonicCount,
TimeStamp, PubKeyIndex, NameSize, DataSize, VendorGuid), name, data,
4-byte aligned."""
import struct
import sys
import uuid


def boot_entries(path):
    d = open(path, "rb").read()
    off = struct.unpack_from("<H", d, 0x30)[0] + 28
    out = []
    while off + 60 <= len(d):
        start, state = struct.unpack_from("<HB", d, off)
        if start != 0x55AA:
            break
        name_size, data_size = struct.unpack_from("<II", d, off + 36)
        name = d[off + 60:off + 60 + name_size].decode("utf-16-le", "replace").rstrip("\0")
        data = d[off + 60 + name_size:off + 60 + name_size + data_size]
        off = (off + 60 + name_size + data_size + 3) & ~3
        if state not in (0x3F, 0x3E):
            continue
        if not (len(name) == 8 and name.startswith("Boot")):
            continue
        try:
            int(name[4:], 16)
        except ValueError:
            continue
        # EFI_LOAD_OPTION: Attributes u32, FilePathListLength u16,
        # Description (UCS-2, NUL-terminated), device path.
        plen = struct.unpack_from("<H", data, 4)[0]
        i = 6
        while i + 1 < len(data) and data[i:i + 2] != b"\0\0":
            i += 2
        desc = data[6:i].decode("utf-16-le", "replace")
        dp = data[i + 2:i + 2 + plen]
        guid = file = "-"
        j = 0
        while j + 4 <= len(dp):
            t, st, ln = dp[j], dp[j + 1], struct.unpack_from("<H", dp, j + 2)[0]
            if t == 4 and st == 1 and ln >= 42:  # HD(): signature at 24..40
                guid = str(uuid.UUID(bytes_le=dp[j + 24:j + 40]))
            elif t == 4 and st == 4:  # File()
                file = dp[j + 4:j + ln].decode("utf-16-le", "replace").rstrip("\0")
            if t == 0x7F or ln < 4:
                break
            j += ln
        out.append((name, desc, guid, file))
    return out


if __name__ == "__main__":
    for e in boot_entries(sys.argv[1]):
        print("\t".join(e))
