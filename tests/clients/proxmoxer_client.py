"""A third-party Proxmox client (proxmoxer) against `nixgold sim serve`.

Run by tests/sim_serve.rs with the endpoint, token and CA file of a running
simulator. Exits non-zero on the first deviation.
"""
import os
import sys
import time
from urllib.parse import urlparse

from proxmoxer import ProxmoxAPI

endpoint = urlparse(os.environ["SIM_ENDPOINT"])
token_id, secret = os.environ["SIM_TOKEN"].rsplit("=", 1)
user, token_name = token_id.split("!")
ca = os.environ["SIM_CA"]
phase = sys.argv[1]


def wait(px, node, upid):
    for _ in range(500):
        status = px.nodes(node).tasks(upid).status.get()
        if status["status"] == "stopped":
            return status["exitstatus"]
        time.sleep(0.02)
    raise SystemExit(f"task {upid} never stopped")


px = ProxmoxAPI(endpoint.hostname, port=endpoint.port, user=user, token_name=token_name,
                token_value=secret, verify_ssl=ca, service="PVE")

if phase == "create":
    nodes = px.nodes.get()
    assert [n["node"] for n in nodes] == ["pve"], nodes
    assert px.version.get()["release"] == "9.1"
    upid = px.nodes("pve").qemu.post(vmid=100, name="px-test", memory=1024, cores=2,
                                     scsi0="tank:4", net0="virtio,bridge=vmbr0")
    assert upid.startswith("UPID:pve:") and upid.endswith(f":qmcreate:100:{token_id}:"), upid
    assert wait(px, "pve", upid) == "OK"
    upid = px.nodes("pve").qemu(100).clone.post(newid=101, name="px-clone", full=1)
    assert wait(px, "pve", upid) == "OK"
    config = px.nodes("pve").qemu(101).config.get()
    assert config["name"] == "px-clone", config
    assert len(config["digest"]) == 40, config
    assert config["memory"] == "1024" and config["cores"] == 2, config
    tasks = px.nodes("pve").tasks.get(vmid=100)
    assert [t["type"] for t in tasks] == ["qmclone", "qmcreate"], tasks
    assert all(t["status"] == "OK" and t["user"] == token_id for t in tasks), tasks
    assert px.nodes("pve").status.get()["pveversion"].startswith("pve-manager/9.1"), "node status"
    assert [n["name"] for n in px.cluster.status.get() if n["type"] == "node"] == ["pve"]
    resources = px.cluster.resources.get(type="vm")
    assert sorted(r["vmid"] for r in resources) == [100, 101], resources
    # Ticket login and a write with the CSRF token, as proxmoxer does it.
    pt = ProxmoxAPI(endpoint.hostname, port=endpoint.port, user="root@pam",
                    password=os.environ["SIM_PASSWORD"], verify_ssl=ca, service="PVE")
    pt.nodes("pve").qemu(101).config.put(description="set with a ticket")
    assert pt.nodes("pve").qemu(101).config.get()["description"] == "set with a ticket"
    print("proxmoxer: create phase OK")
elif phase == "restarted":
    config = px.nodes("pve").qemu(101).config.get()
    assert config["description"] == "set with a ticket", config
    print("proxmoxer: state survived the restart")
else:
    raise SystemExit(f"unknown phase {phase}")
