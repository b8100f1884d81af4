"""Locust load test for the gateway and the HAProxy+Lua reference.

Each user sends GET / without following redirects and checks for a 302 to the
target. Client addresses are sent in X-Forwarded-For (the target must trust the
injector: `--trusted-proxy 127.0.0.1` for the gateway, REF_TRUSTED_PROXIES for
HAProxy). Interactive: `locust -f loadtest/locustfile.py --host http://127.0.0.1:10060`;
headless: add `--headless -u 50 -r 50 -t 30s`.

Options (locust command line or environment):
  --client-ips N          distinct client addresses (default 1: no header, as in the seed)
  --ip-distribution D     uniform or skewed (a few clients send most requests)
  --target-path PATH      the Location the target must redirect to (default /ok)
"""

from __future__ import annotations

import random

from locust import FastHttpUser, events, task
from locust.argument_parser import LocustArgumentParser


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--client-ips", type=int, env_var="LOADTEST_CLIENT_IPS", default=1, help="distinct client IPs")
    parser.add_argument(
        "--ip-distribution",
        choices=["uniform", "skewed"],
        env_var="LOADTEST_IP_DISTRIBUTION",
        default="uniform",
        help="how requests spread over the client IPs",
    )
    parser.add_argument("--target-path", env_var="LOADTEST_TARGET_PATH", default="/ok", help="expected Location")


def client_ip(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


class AccountedUser(FastHttpUser):
    # Redirects are what is measured, so they are never followed.
    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.count = max(1, getattr(opts, "client_ips", 1) if opts else 1)
        self.skewed = (getattr(opts, "ip_distribution", "uniform") if opts else "uniform") == "skewed"
        self.expected = getattr(opts, "target_path", "/ok") if opts else "/ok"
        self.rng = random.Random()

    def _headers(self) -> dict[str, str]:
        if self.count <= 1:
            return {}
        if self.skewed:
            index = min(self.count - 1, int(self.count ** self.rng.random()) - 1)
        else:
            index = self.rng.randrange(self.count)
        return {"X-Forwarded-For": client_ip(index)}

    @task
    def hit(self) -> None:
        with self.client.get("/", headers=self._headers(), allow_redirects=False, catch_response=True) as resp:
            if resp.status_code != 302 or resp.headers.get("Location") != self.expected:
                resp.failure(f"expected 302 to {self.expected}, got {resp.status_code}")
            else:
                resp.success()
