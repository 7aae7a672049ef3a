"""A Modbus/TCP peer for Ottomato's tests: pymodbus's own server (3.16,
SimDevice API) on 127.0.0.1, one server per port given, unit id 1.

Known values (non-shared blocks: coils and discrete inputs bit-addressed):
  coils            0..15   alternating True/False (0 is True)
  discrete inputs  0..7    all True
  holding          0       uint16 1234
                   1..2    int32  -123456 (ABCD)
                   3..4    float32 3.5 (ABCD)
                   5..8    float64 -2.25 (ABCD)
                   9..10   float32 3.5, word-swapped (CDAB)
                   11..14  int64 -9876543210 (ABCD)
                   15      int16 -42
                   16..99  zero, writable
  input            0       uint16 2300 (a voltage in 0.1 V)
                   1..2    uint32 4000000000
Anything else is an illegal address (exception 2).

Usage: python3 modbus_peer.py PORT [PORT ...]; prints "ready" once listening.
"""
import asyncio
import struct
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def words(fmt, value):
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]


def holding():
    regs = [1234]
    regs += words("i", -123456)
    regs += words("f", 3.5)
    regs += words("d", -2.25)
    regs += list(reversed(words("f", 3.5)))
    regs += words("q", -9876543210)
    regs += words("h", -42)
    regs += [0] * (100 - len(regs))
    return [SimData(address=0, values=regs, datatype=DataType.REGISTERS)]


def device():
    coils = [SimData(address=0, values=[i % 2 == 0 for i in range(16)], datatype=DataType.BITS)]
    discrete = [SimData(address=0, values=[True] * 8, datatype=DataType.BITS)]
    inputs = [SimData(address=0, values=[2300] + words("I", 4000000000), datatype=DataType.REGISTERS)]
    return SimDevice(id=1, simdata=(coils, discrete, holding(), inputs))


async def main(ports):
    servers = [ModbusTcpServer(device(), address=("127.0.0.1", p)) for p in ports]
    tasks = [asyncio.create_task(s.serve_forever()) for s in servers]
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
