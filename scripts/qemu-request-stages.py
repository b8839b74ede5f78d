#!/usr/bin/env python3
"""Where a QEMU postcopy request waits: one migration of a compare-qemu guest image between two
QEMUs over a tbf-shaped veth (as compare-qemu builds it), with the source traced (request
queued, dequeued by the migration thread, rate-limit waits) and the destination traced
(request, placement), then each request's stages and the rate limiter's waits.

    scripts/qemu-request-stages.py --image DIR/guest-random.img [--mode vanilla|preempt]

The image comes from `pagehint-migrate compare-qemu --workdir DIR` (kept there); --mem must
be the size it was built for. Needs root, KVM, iproute2. Used for the README's "vanilla vs
vanilla" paragraph. Tracing costs QEMU one write per event (the source's rate-limit events
are many in vanilla): the stages are for telling where a request waits, not for timing.
"""
import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_EVENTS = ['ram_save_queue_pages', 'get_queued_page', 'migration_rate_limit_pre',
              'migration_rate_limit_post']
DST_EVENTS = ['postcopy_ram_fault_thread_request', 'postcopy_page_req_del']
NS = ('phstage_s', 'phstage_d')
IPS = ('10.203.0.1', '10.203.0.2')


def sh(*args):
    subprocess.run(args, check=True)


def link(rate_bps):
    for n in NS:
        subprocess.run(['ip', 'netns', 'del', n], stderr=subprocess.DEVNULL)
    sh('ip', 'netns', 'add', NS[0])
    sh('ip', 'netns', 'add', NS[1])
    sh('ip', 'link', 'add', NS[0], 'netns', NS[0], 'type', 'veth', 'peer', 'name', NS[1],
       'netns', NS[1])
    burst = max(rate_bps // 8 // 1000, 64 << 10)
    for ns, ip in zip(NS, IPS):
        sh('ip', '-n', ns, 'addr', 'add', ip + '/30', 'dev', ns)
        sh('ip', '-n', ns, 'link', 'set', ns, 'up')
        sh('ip', '-n', ns, 'link', 'set', 'lo', 'up')
        sh('tc', '-n', ns, 'qdisc', 'replace', 'dev', ns, 'root', 'tbf', 'rate',
           f'{rate_bps}bit', 'burst', str(burst), 'latency', '10000us')


class Qmp:
    def __init__(self, path):
        for _ in range(400):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f'no QMP socket at {path}')
        self.f = self.sock.makefile('rw')
        self.f.readline()
        self.run('qmp_capabilities')

    def run(self, cmd, **args):
        self.f.write(json.dumps({'execute': cmd, **({'arguments': args} if args else {})}) + '\n')
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if 'return' in m:
                return m['return']
            if 'error' in m:
                raise RuntimeError(f'{cmd}: {m["error"]}')


def start(o, work, ns, side, extra):
    sock = os.path.join(work, f'{side}.qmp')
    args = ['ip', 'netns', 'exec', ns, o.qemu, '-name', f'stage-{side},debug-threads=on',
            '-machine', 'pc', '-accel', 'kvm', '-cpu', 'host', '-m', o.mem, '-smp', '1',
            '-nodefaults', '-no-user-config', '-nographic', '-display', 'none',
            '-drive', f'file={o.image},format=raw,if=ide,snapshot=on',
            '-qmp', f'unix:{sock},server=on,wait=off', '-msg', 'timestamp=on',
            '-D', os.path.join(work, f'{side}.trace')] + extra
    log = open(os.path.join(work, f'{side}.log'), 'w')
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), sock


def stamp(text):
    fmt = '%Y-%m-%dT%H:%M:%S.%f' if '.' in text else '%Y-%m-%dT%H:%M:%S'
    d = datetime.datetime.strptime(text.rstrip('Z'), fmt)
    return d.replace(tzinfo=datetime.timezone.utc).timestamp()


def events(path):
    """(time, event, line) of the traced events' lines (QEMU >= 10.1's ISO prefix)."""
    for line in open(path):
        parts = line.split(' ', 2)
        if len(parts) >= 2 and parts[1] in SRC_EVENTS + DST_EVENTS:
            yield stamp(parts[0]), parts[1], line


def analyse(work):
    req, placed, hva_off = {}, {}, {}
    for t, ev, line in events(os.path.join(work, 'dst.trace')):
        if ev == DST_EVENTS[0]:
            hva = int(re.search(r'HVA=0x([0-9a-f]+)', line).group(1), 16) & ~0xfff
            off = int(re.search(r'offset=0x([0-9a-f]+)', line).group(1), 16) & ~0xfff
            req.setdefault(off, t)
            hva_off[hva] = off
        elif ev == DST_EVENTS[1]:
            hva = int(re.search(r'req 0x([0-9a-f]+)', line).group(1), 16)
            if hva in hva_off:
                placed.setdefault(hva_off[hva], t)
    queued, dequeued, waits, urgent, pre = {}, {}, [], 0, None
    for t, ev, line in events(os.path.join(work, 'src.trace')):
        if ev == 'ram_save_queue_pages':
            queued.setdefault(int(re.search(r'start: 0x([0-9a-f]+)', line).group(1), 16), t)
        elif ev == 'get_queued_page':
            dequeued.setdefault(int(re.search(r'/0x([0-9a-f]+)', line).group(1), 16), t)
        elif ev == 'migration_rate_limit_pre':
            pre = t
        elif ev == 'migration_rate_limit_post':
            if pre is not None:
                waits.append(t - pre)
            urgent += 'urgent: 1' in line
            pre = None
    stages = {'request -> source': [], 'source: queued -> dequeued': [],
              'dequeued -> placed': [], 'request -> placed': []}
    for off, t0 in req.items():
        if off in placed:
            stages['request -> placed'].append(placed[off] - t0)
        if off in queued and off in dequeued and off in placed:
            stages['request -> source'].append(queued[off] - t0)
            stages['source: queued -> dequeued'].append(dequeued[off] - queued[off])
            stages['dequeued -> placed'].append(placed[off] - dequeued[off])
    print(f'requests: {len(req)} at the destination, {len(queued)} queued at the source, '
          f'{len(dequeued)} dequeued by the migration thread (vanilla)')
    for name, v in stages.items():
        if v:
            v.sort()
            print(f'  {name:28s} median {statistics.median(v) * 1e3:9.3f} ms   '
                  f'p90 {v[int(0.9 * (len(v) - 1))] * 1e3:9.3f} ms   ({len(v)})')
    if waits:
        print(f'rate-limit waits: {len(waits)}, median {statistics.median(waits) * 1e3:.3f} ms, '
              f'total {sum(waits):.2f} s; {urgent} of them ended by an urgent request')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--qemu', default=os.path.join(HERE, '..', '.deps', 'qemu-11.1', 'bin',
                                                  'qemu-system-x86_64'))
    p.add_argument('--image', required=True)
    p.add_argument('--mem', default='512M')
    p.add_argument('--mode', choices=['vanilla', 'preempt'], default='vanilla')
    p.add_argument('--rate', type=int, default=1_000_000_000, help='tbf rate, bits/s')
    p.add_argument('--cap', type=float, default=0.9)
    p.add_argument('--settle', type=float, default=14.0,
                   help='seconds for the guest to build its image and run')
    o = p.parse_args()
    work = tempfile.mkdtemp(prefix='qemu-request-stages-')
    link(o.rate)
    procs = []
    try:
        flag = lambda evs: sum((['-trace', f'enable={e}'] for e in evs), [])
        ps, ssock = start(o, work, NS[0], 'src', flag(SRC_EVENTS))
        pd, dsock = start(o, work, NS[1], 'dst', flag(DST_EVENTS) + ['-incoming', 'defer'])
        procs = [ps, pd]
        s, d = Qmp(ssock), Qmp(dsock)
        time.sleep(o.settle)
        caps = [{'capability': 'postcopy-ram', 'state': True}]
        if o.mode == 'preempt':
            caps.append({'capability': 'postcopy-preempt', 'state': True})
        s.run('migrate-set-capabilities', capabilities=caps)
        d.run('migrate-set-capabilities',
              capabilities=caps + [{'capability': 'postcopy-blocktime', 'state': True}])
        cap = int(o.rate * o.cap) // 8
        s.run('migrate-set-parameters', **{'max-bandwidth': cap, 'max-postcopy-bandwidth': cap})
        uri = f'tcp:{IPS[1]}:4471'
        d.run('migrate-incoming', uri=uri)
        s.run('migrate', uri=uri)
        s.run('migrate-start-postcopy')
        for q in (s, d):
            while q.run('query-migrate')['status'] != 'completed':
                time.sleep(0.05)
        ram = s.run('query-migrate')['ram']
        print(f'{o.mode}: {ram["postcopy-requests"]} requests, '
              f'{ram["postcopy-bytes"] >> 20} MiB in postcopy; traces in {work}')
        for q in (s, d):
            try:
                q.run('quit')
            except (RuntimeError, OSError, ValueError):
                pass
        time.sleep(1)
        analyse(work)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for n in NS:
            subprocess.run(['ip', 'netns', 'del', n], stderr=subprocess.DEVNULL)


if __name__ == '__main__':
    main()
