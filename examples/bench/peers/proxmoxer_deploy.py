"""Peer benchmark: deploy VMs from one template with proxmoxer, in threads.

What a hand-written parallel script does: per VM, clone the template, set
cores, memory and cloud-init, start; each task is waited for with
proxmoxer's own `Tasks.blocking_status`. No retries: a failed VM is counted.
Prints one JSON object: wall time, successes, failures by message.

    python3 proxmoxer_deploy.py ENDPOINT TOKEN CA_FILE NODES TEMPLATE FIRST_VMID COUNT FULL THREADS

NODES is a comma-separated list: the template is on the first; VMs go to
the nodes in turn (a clone onto another node passes `target`).
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from proxmoxer import ProxmoxAPI
from proxmoxer.tools import Tasks

endpoint, token, ca, nodes, template, first, count, full, threads = sys.argv[1:10]
nodes = nodes.split(",")
url = urlparse(endpoint)
token_id, secret = token.rsplit("=", 1)
user, token_name = token_id.split("!")
px = ProxmoxAPI(url.hostname, port=url.port, user=user, token_name=token_name,
                token_value=secret, verify_ssl=ca, service="PVE", timeout=120)


def wait(upid):
    status = Tasks.blocking_status(px, upid, timeout=600, polling_interval=0.1)
    if status is None or status.get("exitstatus") != "OK":
        raise RuntimeError((status or {}).get("exitstatus", "task did not end"))


def deploy(vmid):
    node = nodes[(vmid - int(first)) % len(nodes)]
    target = {} if node == nodes[0] else {"target": node}
    try:
        wait(px.nodes(nodes[0]).qemu(template).clone.post(
            newid=vmid, name=f"peer-{vmid}", full=int(full), **target))
        wait(px.nodes(node).qemu(vmid).config.post(
            cores=2, memory=2048, ipconfig0="ip=dhcp", ciuser="ops"))
        wait(px.nodes(node).qemu(vmid).status.start.post())
        return None
    except Exception as e:  # a failed VM is counted, not retried
        return str(e).strip()


start = time.monotonic()
with ThreadPoolExecutor(max_workers=int(threads)) as pool:
    results = list(pool.map(deploy, range(int(first), int(first) + int(count))))
wall = time.monotonic() - start
failures = {}
for r in results:
    if r is not None:
        failures[r] = failures.get(r, 0) + 1
print(json.dumps({"wall": wall, "ok": results.count(None), "failures": failures}))
