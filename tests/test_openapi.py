"""The /v1 API against its own OpenAPI document: schemathesis drives a live gateway with signed requests.

Every operation of ``gateway/openapi.yaml`` gets generated requests, valid ones and invalid ones,
sent by a real admin's keypair; each answer must be no server error, have a documented status and
content type, and match the documented schema. The gateway runs with no agent, so created
sessions stay PENDING and start nothing; the run is bounded and derandomized. Every other positive
case of an operation on a vfolder, an upload or an invitation is sent to one that exists
(:class:`LiveIds`), so that the file API is driven past its "no such vfolder".
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from backendai_jupyter.common import signing
from backendai_jupyter.common.clientconfig import ClientConfig

from .stack import Api, Cluster, aid, port_span

# Answers: never a 5xx, a documented status and content type, the documented schema; and invalid
# input (a wrong JSON type, a "false" for false) refused with a 4xx rather than taken.
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    negative_data_rejection,
]
MAX_EXAMPLES = 30  # per operation and generation mode
# The 29 vfolder operations get all their coverage cases but a third of the examples: at 30 they
# more than doubled the run. As it is, the run takes about 75 seconds on two cores.
VFOLDER_EXAMPLES = 10


class SignedRequests(requests.auth.AuthBase):
    """Signs each request as sent (method, path with query, body bytes), the way our clients do."""

    def __init__(self, access_key: str, secret_key: str) -> None:
        self.access_key, self.secret_key = access_key, secret_key

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        # A generated ?token= (the spec's third scheme) would win over the signature: drop it, so
        # that every case reaches the handlers; token callers are tested on their own.
        url = urlsplit(r.url or "")
        query = [(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k != "token"]
        r.url = urlunsplit(url._replace(query=urlencode(query)))
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode()
        assert r.method is not None and r.path_url is not None
        r.headers.update(signing.sign(self.access_key, self.secret_key, r.method, r.path_url, body))
        return r


class LiveIds:
    """Ids that exist, for every other positive case: random ones only ever find nothing.

    The run's admin owns a vfolder with a file (a.txt), a folder and an open upload in it
    (restored when a case trashes it, made again when one is gone), and another user keeps an
    invitation to the run's admin pending (invited again once a case has answered it).
    """

    def __init__(self, api: Api, inviter: Api, invitee: str) -> None:
        self.api, self.inviter, self.invitee = api, inviter, invitee
        self.shared = inviter("POST", "/v1/vfolders", {"name": f"shared-{secrets.token_hex(4)}"})["id"]
        self._vid = self._uid = self._iid = ""
        self._stale: set[str] = set()

    def fill(self, case: schemathesis.Case, n: int) -> None:
        if n % 2 or case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
            return
        params = case.path_parameters or {}
        if "vid" in params:
            params["vid"] = self.vid()
            if "uid" in params:
                params["uid"] = self.uid()
            if n % 4 == 0 and case.method == "GET" and "path" in (case.query or {}):
                case.query["path"] = "a.txt"  # reads (and ranges) of a file that is there
        if "iid" in params:
            params["iid"] = self.iid()

    def after(self, case: schemathesis.Case) -> None:
        """Whatever a case may have changed is checked before its next use."""
        params = case.path_parameters or {}
        for name in ("vid", "uid", "iid"):
            if params.get(name) == getattr(self, f"_{name}") and case.method != "GET":
                self._stale.add(name)

    def vid(self) -> str:
        if self._vid and "vid" in self._stale:
            r = self.api.request("GET", f"/v1/vfolders/{self._vid}")
            if r.status_code == 200 and r.json()["status"] == "trash":
                r = self.api.request("POST", f"/v1/vfolders/{self._vid}/restore")
            if r.status_code != 200:
                self._vid = ""
            elif r.json()["quota_bytes"] < 2**30:
                self.api("PATCH", f"/v1/vfolders/{self._vid}", {"quota": "10g"})
        if not self._vid:
            self._vid = self.api("POST", "/v1/vfolders", {"name": f"live-{secrets.token_hex(4)}"})["id"]
            self._uid = ""
            assert self.api.raw("PUT", f"/v1/vfolders/{self._vid}/content?path=a.txt", b"hello").ok
            self.api("POST", f"/v1/vfolders/{self._vid}/mkdir", {"path": "d"})
        self._stale.discard("vid")
        return self._vid

    def uid(self) -> str:
        if self._uid and "uid" in self._stale:
            if self.api.request("GET", f"/v1/vfolders/{self._vid}/uploads/{self._uid}").status_code != 200:
                self._uid = ""
        if not self._uid:
            body = {"path": "d/upload.bin", "size": 1 << 16}
            self._uid = self.api("POST", f"/v1/vfolders/{self._vid}/uploads", body)["upload_id"]
        self._stale.discard("uid")
        return self._uid

    def iid(self) -> str:
        if self._iid and "iid" in self._stale:
            received = self.api("GET", "/v1/vfolders/invitations")["received"]
            if all(i["id"] != self._iid for i in received):
                self._iid = ""
                self.api.request("POST", f"/v1/vfolders/{self.shared}/leave")  # after an accept
        if not self._iid:
            body = {"user": self.invitee, "permission": "ro"}
            self._iid = self.inviter("POST", f"/v1/vfolders/{self.shared}/invitations", body)["id"]
        self._stale.discard("iid")
        return self._iid


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("openapi"), aid("test-openapi"), port_span("31750-31799"))
    try:
        yield c
    finally:
        c.close()


def test_the_served_spec_is_the_packaged_file(gateway: Cluster):
    import yaml

    import backendai_jupyter.gateway

    packaged = Path(backendai_jupyter.gateway.__file__).with_name("openapi.yaml")
    served = requests.get(gateway.url + "/v1/openapi.json", timeout=10).json()
    assert served == yaml.safe_load(packaged.read_text())
    # Every route of the gateway's /v1 table is described.
    routes = {p for p in served["paths"]}
    assert routes >= {
        "/v1",
        "/v1/sessions",
        "/v1/sessions/{sid}",
        "/v1/sessions/{sid}/interrupt",
        "/v1/sessions/{sid}/signal",
        "/v1/sessions/{sid}/restart",
        "/v1/sessions/{sid}/events",
        "/v1/agents",
        "/v1/agents/{agent_id}/drain",
        "/v1/agents/{agent_id}/undrain",
        "/v1/agents/connect",
        "/v1/admin/users",
        "/v1/admin/users/{name}",
        "/v1/admin/users/{name}/token",
        "/v1/admin/users/{name}/keypair",
        "/v1/agents/{agent_id}/key",
        "/v1/admin/policies",
        "/v1/admin/policies/{name}",
        "/v1/vfolders",
        "/v1/vfolders/invitations",
        "/v1/vfolders/invitations/{iid}",
        "/v1/vfolders/invitations/{iid}/accept",
        "/v1/vfolders/invitations/{iid}/reject",
        "/v1/vfolders/{vid}",
        "/v1/vfolders/{vid}/restore",
        "/v1/vfolders/{vid}/purge",
        "/v1/vfolders/{vid}/usage",
        "/v1/vfolders/{vid}/invitations",
        "/v1/vfolders/{vid}/shares",
        "/v1/vfolders/{vid}/shares/{user}",
        "/v1/vfolders/{vid}/leave",
        "/v1/vfolders/{vid}/files",
        "/v1/vfolders/{vid}/stat",
        "/v1/vfolders/{vid}/download",
        "/v1/vfolders/{vid}/content",
        "/v1/vfolders/{vid}/mkdir",
        "/v1/vfolders/{vid}/move",
        "/v1/vfolders/{vid}/copy",
        "/v1/vfolders/{vid}/uploads",
        "/v1/vfolders/{vid}/uploads/{uid}",
    }


def test_v1_answers_as_its_openapi_spec_says(gateway: Cluster):
    # A user of its own, so that nothing the run does (disabling, deleting) can lock out the test.
    created = gateway.api("POST", "/v1/admin/users", {"name": "schemathesis-admin", "is_admin": True})
    api = Api(ClientConfig(gateway.url, created["access_key"], created["secret_key"]))
    http = requests.Session()
    http.auth = SignedRequests(api.config.access_key, api.config.secret_key)
    schema = schemathesis.openapi.from_url(gateway.url + "/v1/openapi.json")
    live = LiveIds(api, gateway.api, "schemathesis-admin")

    cases: dict[str, int] = {}
    failures: list[str] = []

    def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
        label = f"{operation.label} [{mode.value}]"
        cases[label] = 0
        examples = VFOLDER_EXAMPLES if operation.path.startswith("/v1/vfolders") else MAX_EXAMPLES

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            check(label, case)

        try:
            run()
        except Unsatisfiable:
            # Nothing to make invalid: an operation without parameters or body has no negative cases.
            assert mode is GenerationMode.NEGATIVE and cases[label] == 0, label

    def check(label: str, case: schemathesis.Case) -> None:
        cases[label] = cases.get(label, 0) + 1
        live.fill(case, cases[label])
        response = case.call(base_url=gateway.url, session=http, timeout=30)
        live.after(case)
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as e:  # collected and reported together below, unshrunk
            failures.append(f"{label}: {case.method} {case.formatted_path} {case.body!r:.300} -> {e}"[:1500])

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        # Schemathesis' coverage phase: each parameter and body field at its edges and with every
        # wrong JSON type, one at a time (deterministic by construction).
        config = schema.config.generation_for(operation=operation)
        for case in schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=config
        ):
            check(f"{operation.label} [coverage]", case)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)

    total = sum(cases.values())
    print(f"\nschemathesis: {len(operations)} operations, {total} cases, {len(failures)} failures")
    for label, n in cases.items():
        print(f"  {n:4d}  {label}")
    assert not failures, "\n\n".join(failures[:20])
    assert total > 0
    # The admin whose keypair did the run is still there and still signs requests.
    assert api("GET", "/v1")["user"] == "schemathesis-admin"
