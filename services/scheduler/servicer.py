"""gRPC methods of llmfabric.scheduler.v1.SchedulerService."""

from __future__ import annotations

from llmfabric.convert import chunk_to_pb, request_from_pb
from llmfabric.runtime.errors import InvalidArgument
from llmfabric.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from .dispatcher import Dispatcher

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    async def Submit(self, request, context):
        req = request_from_pb(request.request)
        if not req.prompt_token_ids:
            raise InvalidArgument("request.prompt_token_ids", "must not be empty")
        first = True
        async for chunk, worker_id in self.dispatcher.submit(req, timeout=context.time_remaining()):
            last = chunk.finish is not None
            yield scheduler_pb2.SubmitResponse(chunk=chunk_to_pb(chunk), worker_id=worker_id if first or last else "")
            first = False

    async def GetStatus(self, request, context):
        d = self.dispatcher
        return scheduler_pb2.GetStatusResponse(
            queued=len(d.queue),
            running=d.running,
            workers=[
                scheduler_pb2.WorkerStatus(
                    id=w.id, address=w.address, healthy=w.healthy, in_flight=w.in_flight, capacity=w.capacity
                )
                for w in d.pool.workers.values()
            ],
        )
