//! AppendEntries of every shard between two nodes, on one gRPC stream per
//! node pair ([`crate::api::mux`]).
//!
//! A node leads many shards, and each shard replicates to each peer with its
//! own AppendEntries calls, most of them small (a few commands, or only a
//! commit index). On the stream, the calls of all shards that queue up
//! meanwhile leave as one message, and a reply never waits for another
//! shard's call.

use crate::api::mux::{stream_messages, stream_methods, Mux, Protocol};
use crate::api::pb::raft::{
    AppendCall, AppendCallBatch, AppendCallReply, AppendReplyBatch, RaftReply, RaftRequest,
};
use crate::shard::network::PeerClient;

/// AppendEntries calls, as [`Protocol`] of a node pair's append stream.
pub struct AppendCalls;

/// The append stream to one peer.
pub type AppendMux = Mux<AppendCalls>;

impl Protocol for AppendCalls {
    type Client = PeerClient;
    type Request = RaftRequest;
    type Reply = RaftReply;
    type Batch = AppendCallBatch;
    type ReplyBatch = AppendReplyBatch;
    const NAME: &'static str = "append stream";
    const BATCH_METRIC: &'static str = crate::metrics::RAFT_APPEND_BATCH;

    stream_messages!(
        RaftRequest,
        RaftReply,
        AppendCall,
        AppendCallBatch,
        AppendCallReply,
        AppendReplyBatch
    );

    stream_methods!(append_stream, append_entries);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tonic::{Code, Request, Response, Status, Streaming};

    use super::AppendMux;
    use crate::api::pb::raft::raft_reply::Result as ReplyResult;
    use crate::api::pb::raft::raft_transport_client::RaftTransportClient;
    use crate::api::pb::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
    use crate::api::pb::raft::{
        AppendCallBatch, AppendCallReply, AppendReplyBatch, PingReply, PingRequest, QuiesceReply,
        QuiesceRequest, RaftReply, RaftRequest, SnapshotChunk,
    };
    use crate::cluster::latency::Delayed;

    /// A peer that answers each call with its own payload, a batch's replies
    /// in reverse order; a call with payload "break" breaks the stream, one
    /// with "hang" gets no answer.
    /// Without `stream` it knows only unary AppendEntries.
    #[derive(Clone)]
    struct Echo {
        stream: Arc<AtomicBool>,
        opens: Arc<AtomicUsize>,
    }

    fn echo(req: &RaftRequest) -> RaftReply {
        RaftReply {
            result: Some(ReplyResult::Ok(req.payload.clone())),
        }
    }

    type ReplyStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<AppendReplyBatch, Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl RaftTransport for Echo {
        async fn append_entries(
            &self,
            request: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Ok(Response::new(echo(request.get_ref())))
        }

        type AppendStreamStream = ReplyStream;

        async fn append_stream(
            &self,
            request: Request<Streaming<AppendCallBatch>>,
        ) -> Result<Response<ReplyStream>, Status> {
            if !self.stream.load(Ordering::SeqCst) {
                return Err(Status::unimplemented("no append stream"));
            }
            self.opens.fetch_add(1, Ordering::SeqCst);
            let mut calls = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(batch)) = calls.message().await {
                    let mut replies = Vec::new();
                    for call in batch.calls.into_iter().rev() {
                        let req = call.request.unwrap_or_default();
                        if req.payload.as_ref() == b"break" {
                            let _ = tx.send(Err(Status::aborted("broken on purpose"))).await;
                            return;
                        }
                        if req.payload.as_ref() == b"hang" {
                            continue;
                        }
                        replies.push(AppendCallReply {
                            id: call.id,
                            reply: Some(echo(&req)),
                            ..Default::default()
                        });
                    }
                    if tx.send(Ok(AppendReplyBatch { replies })).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn transfer_leader(
            &self,
            _: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn quiesce(
            &self,
            _: Request<QuiesceRequest>,
        ) -> Result<Response<QuiesceReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `peer` on a free loopback port; returns a mux to it.
    async fn mux_to(peer: Echo) -> AppendMux {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer))
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        AppendMux::new(
            RaftTransportClient::new(Delayed::new(channel, Duration::ZERO)),
            9,
            Duration::ZERO,
        )
    }

    fn request(payload: &str) -> RaftRequest {
        RaftRequest {
            payload: payload.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn payload(reply: RaftReply) -> Vec<u8> {
        match reply.result {
            Some(ReplyResult::Ok(b)) => b.to_vec(),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn each_caller_gets_its_own_reply() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: Arc::new(AtomicBool::new(true)),
            opens: opens.clone(),
        })
        .await;
        let calls = (0..200).map(|i| {
            let mux = mux.clone();
            tokio::spawn(async move { (i, mux.call(request(&format!("call {i}")), TIMEOUT).await) })
        });
        for call in calls {
            let (i, reply) = call.await.unwrap();
            assert_eq!(payload(reply.unwrap()), format!("call {i}").into_bytes());
        }
        assert_eq!(opens.load(Ordering::SeqCst), 1, "one stream for all calls");
    }

    #[tokio::test]
    async fn a_broken_stream_fails_its_calls_and_the_next_call_reopens_it() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: Arc::new(AtomicBool::new(true)),
            opens: opens.clone(),
        })
        .await;
        assert_eq!(
            payload(mux.call(request("a"), TIMEOUT).await.unwrap()),
            b"a"
        );
        let broken = mux.call(request("break"), TIMEOUT).await.unwrap_err();
        assert_eq!(broken.code(), Code::Unavailable, "{broken}");
        // Made on this side, as a unary call's connection error would be.
        assert!(std::error::Error::source(&broken).is_some());
        assert_eq!(
            payload(mux.call(request("b"), TIMEOUT).await.unwrap()),
            b"b"
        );
        assert_eq!(opens.load(Ordering::SeqCst), 2);
    }

    /// A call the peer never answers times out like a unary call to a hung
    /// peer: with an error source (not reached), and the stream stays up.
    #[tokio::test]
    async fn an_unanswered_call_times_out_as_not_reached() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: Arc::new(AtomicBool::new(true)),
            opens: opens.clone(),
        })
        .await;
        let hung = mux
            .call(request("hang"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(hung.code(), Code::DeadlineExceeded, "{hung}");
        assert!(std::error::Error::source(&hung).is_some());
        assert_eq!(
            payload(mux.call(request("c"), TIMEOUT).await.unwrap()),
            b"c"
        );
        assert_eq!(opens.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls_then_the_stream_again() {
        let opens = Arc::new(AtomicUsize::new(0));
        let stream = Arc::new(AtomicBool::new(false));
        let mux = mux_to(Echo {
            stream: stream.clone(),
            opens: opens.clone(),
        })
        .await;
        for i in 0..3 {
            let p = format!("unary {i}");
            assert_eq!(
                payload(mux.call(request(&p), TIMEOUT).await.unwrap()),
                p.into_bytes()
            );
        }
        assert_eq!(opens.load(Ordering::SeqCst), 0);
        // The peer is upgraded; within a minute calls stay unary, after it
        // the stream is tried again and taken.
        stream.store(true, Ordering::SeqCst);
        assert_eq!(
            payload(mux.call(request("x"), TIMEOUT).await.unwrap()),
            b"x"
        );
        assert_eq!(opens.load(Ordering::SeqCst), 0);
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(61)).await;
        tokio::time::resume();
        assert_eq!(
            payload(mux.call(request("y"), TIMEOUT).await.unwrap()),
            b"y"
        );
        assert_eq!(opens.load(Ordering::SeqCst), 1, "the stream is tried again");
    }
}
