"""The network kernels run on, and the host firewall rules that fence it in.

Why one dedicated bridge and not Docker's default one: the default bridge lets containers talk
to each other, and a kernel listens on all interfaces of its container, so any kernel could
subscribe to another user's IOPub. Our bridge is created with inter-container traffic off
(``enable_icc=false``): kernels share it but cannot reach each other, and their channels are
also CurveZMQ-encrypted. Why not one network per session: creating and removing a network
costs a round of netlink and iptables work on every launch (a few hundred ms on a small host)
and the daemon's address pools run out after a few dozen networks; ICC off gives the same
isolation between kernels for free.

What a network cannot do on its own is keep kernels away from the host: a container reaches
every address of its host (the gateway, the agent's control link, sshd, ...) through its bridge,
and on clouds the metadata service at 169.254.169.254 through the host's route. Those need
iptables rules, which only root (or CAP_NET_ADMIN) can add:

- ``INPUT -i BRIDGE`` dropped unless ESTABLISHED/RELATED: nothing on the host takes a new
  connection from a kernel, while the replies to docker-proxy's connections (the published
  ports) still pass;
- ``DOCKER-USER -i BRIDGE -d 169.254.0.0/16`` dropped: no link-local metadata service;
- when egress is denied, ``DOCKER-USER -i BRIDGE ! -o BRIDGE`` dropped for new connections:
  a kernel can answer its clients but open nothing beyond its host.

Every rule is checked (``iptables -C``) before it is inserted, so starting the agent again adds
nothing twice, and :meth:`KernelFirewall.remove` takes them all out.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

import docker
import docker.errors

from .base import BackendError

log = logging.getLogger(__name__)

ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
METADATA_NET = "169.254.0.0/16"
_ESTABLISHED = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"]
_NOT_ESTABLISHED = ["-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED"]


def ensure_network(client: docker.DockerClient, name: str, bridge: str) -> str:
    """Create the kernels' bridge network unless it exists; refuse one that lets kernels talk."""
    try:
        net = client.networks.get(name)
    except docker.errors.NotFound:
        try:
            net = client.networks.create(
                name,
                driver="bridge",
                options={ICC_OPTION: "false", BRIDGE_NAME_OPTION: bridge},
                labels={"io.backendai-jupyter.kernel-network": "1"},
            )
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: another agent on this host created it just now
                why = e.explanation or e
                raise BackendError(f"could not create the kernel network {name}: {why}") from None
            net = client.networks.get(name)
    options = net.attrs.get("Options") or {}
    if net.attrs.get("Driver") != "bridge" or options.get(ICC_OPTION) != "false":
        raise BackendError(
            f"Docker network {name} exists but lets containers reach each other (it needs the bridge "
            f"driver and {ICC_OPTION}=false): remove it (`docker network rm {name}`) so the agent "
            "creates it, or name another one with --Agent.kernel_network"
        )
    if options.get(BRIDGE_NAME_OPTION, bridge) != bridge:
        raise BackendError(
            f"Docker network {name} uses bridge interface {options[BRIDGE_NAME_OPTION]}, not {bridge}: "
            f"set --Agent.kernel_bridge={options[BRIDGE_NAME_OPTION]} or remove the network"
        )
    return str(net.id)


@dataclass(frozen=True)
class Rule:
    """One iptables rule: its table's chain and the match and target after it."""

    chain: str
    spec: tuple[str, ...]

    def command(self, action: str) -> list[str]:
        return ["iptables", "-w", action, self.chain, *self.spec]

    def shown(self) -> str:
        return " ".join(["iptables", "-I", self.chain, *self.spec])


class KernelFirewall:
    """The iptables rules around one kernel bridge (see the module docstring for why)."""

    def __init__(self, bridge: str, *, egress: bool) -> None:
        self.bridge = bridge
        self.egress = egress

    def rules(self, *, egress: bool) -> list[Rule]:
        """The rules for the given egress setting, in the order they must match."""
        br = self.bridge
        rules = [
            Rule("INPUT", ("-i", br, *_NOT_ESTABLISHED, "-j", "DROP")),
            Rule("DOCKER-USER", ("-i", br, "-d", METADATA_NET, "-j", "DROP")),
        ]
        if not egress:
            rules.append(Rule("DOCKER-USER", ("-i", br, "!", "-o", br, *_NOT_ESTABLISHED, "-j", "DROP")))
        return rules

    def apply(self) -> bool:
        """Install the rules (and drop an egress rule no longer wanted); False when not permitted."""
        try:
            for rule in self.rules(egress=self.egress):
                if not self._present(rule):
                    _iptables(rule.command("-I"))
            stale = set(self.rules(egress=False)) - set(self.rules(egress=self.egress))
            for rule in stale:
                while self._present(rule):
                    _iptables(rule.command("-D"))
        except (OSError, subprocess.CalledProcessError) as e:
            why = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
            log.warning(
                "could not install the kernel firewall (%s). Kernels on bridge %s can reach every "
                "service on this host and the metadata address 169.254.169.254%s. Run the agent as root "
                "(or with CAP_NET_ADMIN), or add these rules yourself: %s",
                why,
                self.bridge,
                "" if self.egress else ", and egress is NOT denied",
                "; ".join(r.shown() for r in self.rules(egress=self.egress)),
            )
            return False
        return True

    def remove(self) -> None:
        """Take every rule for this bridge out again (either egress setting)."""
        for rule in self.rules(egress=False):
            while self._present(rule):
                _iptables(rule.command("-D"))

    def _present(self, rule: Rule) -> bool:
        return _iptables(rule.command("-C"), check=False).returncode == 0


def _iptables(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise OSError(f"{cmd[0]} not found")
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)
