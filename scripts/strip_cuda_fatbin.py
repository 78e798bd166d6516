"""Shrink a CUDA library for a size-limited transfer to a GPU machine of one architecture (how
scripts/gpu-check.sh was run on an H200 through a 64 MiB-per-call link): zeroes the payload of every
cubin in the .nv_fatbin section whose SM architecture is not in KEEP, leaving all headers intact, so
the file compresses to what that GPU needs (onnxruntime-gpu 1.31.1 libonnxruntime_providers_cuda.so:
284 MB, xz -9 of the sm_90-only copy 51.6 MB). The copy only runs on the kept architectures. A
development aid for the GPU check; the product uses the wheel unchanged.

    python3 scripts/strip_cuda_fatbin.py SRC.so DST.so 90 && xz -9 -T0 DST.so
"""
import struct, sys
if len(sys.argv) != 4:
    sys.exit(__doc__)
src, dst, keep = sys.argv[1], sys.argv[2], {int(a) for a in sys.argv[3].split(',')}
data = bytearray(open(src, 'rb').read())
e_shoff, = struct.unpack_from('<Q', data, 0x28)
e_shentsize, e_shnum, e_shstrndx = struct.unpack_from('<HHH', data, 0x3A)
secs = [struct.unpack_from('<IIQQQQ', data, e_shoff + i*e_shentsize) for i in range(e_shnum)]
stroff = secs[e_shstrndx][4]
def nm(n): return bytes(data[stroff+n:data.index(b'\0', stroff+n)]).decode()
zeroed = kept = 0
compressed = 0
for name, typ, flags, addr, off, size in secs:
    if nm(name) != '.nv_fatbin': continue
    p, end = off, off + size
    while p < end:
        magic, ver, hs, fs = struct.unpack_from('<IHHQ', data, p)
        if magic != 0xBA55ED50: p += 8; continue
        q = p + hs; cend = q + fs
        while q < cend:
            kind, _, ehs, psize = struct.unpack_from('<HHIQ', data, q)
            arch, = struct.unpack_from('<I', data, q + 28)
            eflags, = struct.unpack_from('<Q', data, q + 40)
            if eflags & 0x2000: compressed += 1
            if arch not in keep:
                data[q+ehs:q+ehs+psize] = bytes(psize); zeroed += psize
            else: kept += psize
            q += ehs + psize
        p = cend
open(dst, 'wb').write(data)
print('zeroed', zeroed//1_000_000, 'MB kept', kept//1_000_000, 'MB; compressed entries', compressed)
