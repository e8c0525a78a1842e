//! `stream: true`: server-sent events, one `data: {chunk}` per generated token and choice,
//! then (with `stream_options.include_usage`) a chunk with the usage and no choices, then
//! `data: [DONE]`. The event stream owns the choices' response streams: when the client goes
//! away hyper drops it, which drops them, which cancels the requests (see `server::requests`).
use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use serde_json::{Value, json};
use switchyard_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use super::choices::{Kind, Prepared, TokenLogprob, chunk, finish_reason, logprobs_json, usage_json};
use super::error::ApiError;
use crate::server::CoordSvc;

type Choice = ReceiverStream<Result<pb::GenerateResponse, tonic::Status>>;

struct State {
    svc: CoordSvc,
    p: Prepared,
    choices: StreamMap<usize, Choice>,
    /// Events ready to go out before the next message is read.
    ready: VecDeque<Event>,
    /// Bytes of text sent per choice (completion logprobs' `text_offset`).
    offsets: Vec<usize>,
    prompt_tokens: u32,
    completion_tokens: u32,
    done: bool,
}

fn event(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

impl State {
    /// The chunk of one token of choice `i`.
    fn on_message(&mut self, i: usize, m: pb::GenerateResponse) {
        let finish = finish_reason(m.finish_reason);
        if let Some(u) = m.usage {
            self.prompt_tokens = u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
        let logprobs = if self.p.req.logprobs {
            logprobs_json(self.p.kind, &[TokenLogprob::of(&self.svc, &m)], self.offsets[i])
        } else {
            // Nothing to say yet (a character or a possible stop string is incomplete).
            if m.text.is_empty() && finish.is_none() {
                return;
            }
            Value::Null
        };
        self.offsets[i] += m.text.len();
        let choice = match self.p.kind {
            Kind::Completion => json!({"index": i, "text": m.text, "logprobs": logprobs, "finish_reason": finish}),
            Kind::Chat => {
                let delta = if m.text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": m.text}) };
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.ready.push_back(event(&chunk(&self.p, vec![choice], None)));
    }

    fn on_end(&mut self) {
        if self.p.include_usage {
            self.ready.push_back(event(&chunk(&self.p, vec![], Some(usage_json(self.prompt_tokens, self.completion_tokens)))));
        }
        self.ready.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }
}

/// The SSE response of started choices.
pub fn sse(svc: CoordSvc, p: Prepared, streams: Vec<Choice>) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let n = streams.len();
    let mut choices = StreamMap::new();
    for (i, s) in streams.into_iter().enumerate() {
        choices.insert(i, s);
    }
    let mut ready = VecDeque::new();
    if p.kind == Kind::Chat {
        // OpenAI opens every chat choice with the assistant's role.
        for i in 0..n {
            let c = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            ready.push_back(event(&chunk(&p, vec![c], None)));
        }
    }
    let st = State { svc, p, choices, ready, offsets: vec![0; n], prompt_tokens: 0, completion_tokens: 0, done: false };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.ready.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.choices.next().await {
                Some((i, Ok(m))) => {
                    let fin = m.finish_reason != 0;
                    st.on_message(i, m);
                    if fin {
                        st.choices.remove(&i);
                    }
                }
                Some((i, Err(status))) => {
                    // The stream has started (status 200 is out): the error goes as an event.
                    st.ready.push_back(event(&ApiError::from(status).body()));
                    st.choices.remove(&i);
                }
                None => st.on_end(),
            }
        }
    });
    Sse::new(events)
}
