"""`GET /v1/cluster`: the replicas sharing this daemon's database, which one leads, and the
probe shards each owns (DESIGN §8). On SQLite: this daemon alone, leader at epoch 0."""

from __future__ import annotations

from collections import defaultdict

from aiohttp import web
from pydantic import BaseModel, Field

from monitor.cluster.membership import Membership
from monitor.http.responses import json_response
from monitor.http.route import Reply, RouteTable

table = RouteTable()


class ClusterMember(BaseModel):
    replica_id: str
    heartbeat_at: float = Field(description="unix time of its last renewal (database clock)")
    shards: list[int] = Field(description="the probe shards it owns (monitor/cluster/shards)")


class ClusterView(BaseModel):
    self_: str = Field(alias="self", description="the replica that answers")
    leader: str | None = Field(description="the leading replica; null while none is known")
    epoch: int = Field(description="grows each time the leadership changes hands")
    members: list[ClusterMember]


class ClusterRoutes:
    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    def routes(self) -> list[web.RouteDef]:
        return table.route_defs(self)

    @table.get(
        "/v1/cluster",
        operation_id="cluster",
        summary="The live replicas, the leader and each one's probe shards",
        replies=(Reply(status=200, description="the cluster", model=ClusterView),),
        errors=(401,),
    )
    async def cluster(self, request: web.Request) -> web.Response:
        """As this replica last saw it (it renews every lease/3, at most every 0.5 s)."""
        membership = self.membership
        shards: dict[str | None, list[int]] = defaultdict(list)
        for shard, owner in enumerate(membership.owners()):
            shards[owner].append(shard)
        return json_response(
            {
                "self": membership.replica_id,
                "leader": membership.replica_of(membership.leader),
                "epoch": membership.epoch,
                "members": [
                    {
                        "replica_id": member.replica_id,
                        "heartbeat_at": member.heartbeat_at,
                        "shards": shards[member.key],
                    }
                    for member in membership.members
                ],
            }
        )
