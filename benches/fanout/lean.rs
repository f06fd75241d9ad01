//! Lean WatchLeadership subscribers: one HTTP/2 connection carrying many WatchLeadership
//! streams, spoken by hand (RFC 9113) and read by one task, each event decoded with prost.
//!
//! Ten thousand subscribers on the daemon's own two cores take CPU away from the daemon. With
//! tonic's client (a task wake-up, a body and a lock per stream per event) they use about as
//! much CPU as the daemon; this reader parses a read's worth of frames in one pass, so the
//! figure is mostly the daemon's, as when the subscribers are other machines. It speaks only
//! what these streams need:
//!
//! - requests: one HEADERS frame (HPACK literals, RFC 7541 section 6.2.2, no Huffman) and one
//!   DATA frame with the request message, per stream;
//! - responses: DATA frames are taken apart into gRPC messages; header blocks are not decoded,
//!   so a HEADERS frame that ends a stream (trailers: the stream failed or the daemon went
//!   away) panics, as do RST_STREAM and GOAWAY;
//! - flow control: the windows are opened to the maximum at the start and topped up after
//!   every 1 GiB read; SETTINGS and PING are acknowledged.

use std::ops::Range;

use baton::proto::{LeadershipEvent, WatchLeadershipRequest};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// The largest flow-control window (2^31 - 1).
const MAX_WINDOW: u32 = i32::MAX as u32;
/// A frame header's stream id, without the reserved bit.
const STREAM_ID: u32 = 0x7fff_ffff;
/// Top a window up after this many bytes read from it.
const TOP_UP: u32 = 1 << 30;
const FRAME_HEADER: usize = 9;
/// A gRPC message's prefix: compressed flag and length.
const MESSAGE_PREFIX: usize = 5;

const PATH: &str = "/baton.v1.Leadership/WatchLeadership";

/// One connection's streams, subscriber `first + i` on stream `2i + 1`.
pub struct Connection {
    socket: TcpStream,
    first: usize,
    /// Bytes read and not yet taken apart into frames.
    input: Vec<u8>,
    /// Control frames to send.
    output: Vec<u8>,
    /// Per stream, message bytes not yet a whole message.
    partial: Vec<Vec<u8>>,
    /// Per stream, and for the connection, bytes read since the last window top-up.
    stream_read: Vec<u32>,
    connection_read: u32,
}

impl Connection {
    /// Connect to `addr` (`host:port`) and open a WatchLeadership stream with `request` for
    /// each of `subscribers`. All the requests go out before the daemon's SETTINGS are read:
    /// the daemon sets no stream limit, and they fit in the default 65,535-byte window.
    pub async fn open(
        addr: &str,
        request: &WatchLeadershipRequest,
        subscribers: Range<usize>,
    ) -> Connection {
        let socket = TcpStream::connect(addr)
            .await
            .expect("connect to the daemon");
        socket.set_nodelay(true).expect("TCP_NODELAY");
        let n = subscribers.len();
        let mut connection = Connection {
            socket,
            first: subscribers.start,
            input: Vec::with_capacity(64 * 1024),
            output: Vec::new(),
            partial: vec![Vec::new(); n],
            stream_read: vec![0; n],
            connection_read: 0,
        };
        let out = &mut connection.output;
        out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        // SETTINGS_ENABLE_PUSH = 0, SETTINGS_INITIAL_WINDOW_SIZE = the largest.
        let mut settings = Vec::new();
        for (id, value) in [(0x2u16, 0u32), (0x4, MAX_WINDOW)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        put_frame(out, SETTINGS, 0, 0, &settings);
        // The connection's window starts at 65,535 whatever the settings say.
        put_frame(
            out,
            WINDOW_UPDATE,
            0,
            0,
            &(MAX_WINDOW - 65_535).to_be_bytes(),
        );

        let headers = header_block(addr);
        let mut message = vec![0; MESSAGE_PREFIX];
        request.encode(&mut message).expect("encode the request");
        let length = (message.len() - MESSAGE_PREFIX) as u32;
        message[1..MESSAGE_PREFIX].copy_from_slice(&length.to_be_bytes());
        for i in 0..n {
            let stream = stream_id(i);
            put_frame(out, HEADERS, END_HEADERS, stream, &headers);
            put_frame(out, DATA, END_STREAM, stream, &message);
        }
        connection.flush().await;
        connection
    }

    /// The events of the next read that completes at least one message, as (subscriber,
    /// event).
    pub async fn next_events(&mut self) -> Vec<(usize, LeadershipEvent)> {
        let mut events = Vec::new();
        loop {
            self.take_frames(&mut events);
            self.flush().await;
            if !events.is_empty() {
                return events;
            }
            let read = self
                .socket
                .read_buf(&mut self.input)
                .await
                .expect("read from the daemon");
            assert!(read > 0, "the daemon closed the connection");
        }
    }

    async fn flush(&mut self) {
        if !self.output.is_empty() {
            self.socket
                .write_all(&self.output)
                .await
                .expect("write to the daemon");
            self.output.clear();
        }
    }

    /// Handle every whole frame in `input`.
    fn take_frames(&mut self, events: &mut Vec<(usize, LeadershipEvent)>) {
        let mut input = std::mem::take(&mut self.input);
        let mut rest = &input[..];
        while let Some(header) = rest.first_chunk::<FRAME_HEADER>() {
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let Some(payload) = rest.get(FRAME_HEADER..FRAME_HEADER + length) else {
                break;
            };
            let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
            self.handle_frame(header[3], header[4], stream & STREAM_ID, payload, events);
            rest = &rest[FRAME_HEADER + length..];
        }
        let used = input.len() - rest.len();
        input.drain(..used);
        self.input = input;
    }

    fn handle_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        events: &mut Vec<(usize, LeadershipEvent)>,
    ) {
        match kind {
            DATA => {
                let index = self.index(stream);
                assert!(
                    flags & END_STREAM == 0,
                    "subscriber {}: the daemon ended its stream",
                    self.first + index
                );
                self.count_read(index, payload.len() as u32);
                let data = if flags & PADDED != 0 {
                    let pad = payload.first().map_or(usize::MAX, |&p| usize::from(p));
                    assert!(
                        pad < payload.len(),
                        "a DATA frame padded past its end (a PROTOCOL_ERROR)"
                    );
                    &payload[1..payload.len() - pad]
                } else {
                    payload
                };
                let subscriber = self.first + index;
                let partial = &mut self.partial[index];
                if partial.is_empty() {
                    // The usual case: the frame holds whole messages.
                    let rest = messages(data, subscriber, events);
                    partial.extend_from_slice(rest);
                } else {
                    partial.extend_from_slice(data);
                    let whole = std::mem::take(partial);
                    let rest = messages(&whole, subscriber, events);
                    partial.extend_from_slice(rest);
                }
            }
            HEADERS => {
                // The response's headers, or trailers: they end the stream, which a watch
                // never does while the daemon runs.
                assert!(
                    flags & END_STREAM == 0,
                    "subscriber {}: the stream ended with trailers (an error status, or the \
                     daemon is shutting down)",
                    self.first + self.index(stream)
                );
            }
            RST_STREAM => panic!(
                "subscriber {}: the daemon reset its stream (error code {})",
                self.first + self.index(stream),
                u32::from_be_bytes(payload[..4].try_into().expect("error code"))
            ),
            SETTINGS if flags & ACK == 0 => put_frame(&mut self.output, SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => put_frame(&mut self.output, PING, ACK, 0, payload),
            GOAWAY => panic!(
                "the daemon sent GOAWAY (error code {})",
                u32::from_be_bytes(payload[4..8].try_into().expect("error code"))
            ),
            // WINDOW_UPDATE (this side sends nothing after the requests), acknowledgements,
            // CONTINUATION of a header block, PRIORITY, unknown kinds: nothing to do.
            _ => {}
        }
    }

    fn index(&self, stream: u32) -> usize {
        assert!(
            stream % 2 == 1 && (stream as usize) / 2 < self.partial.len(),
            "a frame on stream {stream}, which this side did not open"
        );
        (stream as usize) / 2
    }

    /// Count `length` bytes read on stream `index`, topping the windows up as they run down.
    fn count_read(&mut self, index: usize, length: u32) {
        self.connection_read += length;
        if self.connection_read >= TOP_UP {
            let increment = std::mem::take(&mut self.connection_read);
            put_frame(
                &mut self.output,
                WINDOW_UPDATE,
                0,
                0,
                &increment.to_be_bytes(),
            );
        }
        let read = &mut self.stream_read[index];
        *read += length;
        if *read >= TOP_UP {
            let increment = std::mem::take(read);
            let stream = stream_id(index);
            put_frame(
                &mut self.output,
                WINDOW_UPDATE,
                0,
                stream,
                &increment.to_be_bytes(),
            );
        }
    }
}

/// Decode the whole gRPC messages at the start of `data` as `subscriber`'s events; returns
/// the bytes after them (the start of a message still arriving).
fn messages<'a>(
    mut data: &'a [u8],
    subscriber: usize,
    events: &mut Vec<(usize, LeadershipEvent)>,
) -> &'a [u8] {
    while let Some(prefix) = data.first_chunk::<MESSAGE_PREFIX>() {
        assert_eq!(prefix[0], 0, "a compressed message was not asked for");
        let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        let Some(message) = data.get(MESSAGE_PREFIX..MESSAGE_PREFIX + length) else {
            break;
        };
        let event = LeadershipEvent::decode(message).expect("decode a LeadershipEvent");
        events.push((subscriber, event));
        data = &data[MESSAGE_PREFIX + length..];
    }
    data
}

/// Stream `index`'s id: client streams are odd, opened in order.
fn stream_id(index: usize) -> u32 {
    2 * index as u32 + 1
}

/// Append one frame.
fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The request's header block: static-table fields by index, the rest as literals without
/// indexing (every string here is under 127 bytes, so each length is one byte).
fn header_block(authority: &str) -> Vec<u8> {
    let mut block = vec![
        0x83, // :method: POST (static index 3)
        0x86, // :scheme: http (static index 6)
    ];
    let mut literal = |name: &[u8], value: &str| {
        block.extend_from_slice(name);
        assert!(value.len() < 127, "header value too long for this encoder");
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    };
    literal(&[0x04], PATH); // :path (static index 4)
    literal(&[0x01], authority); // :authority (static index 1)
    literal(&[0x0f, 0x10], "application/grpc"); // content-type (static index 31)
    literal(&[0x00, 0x02, b't', b'e'], "trailers"); // te: a new name
    block
}
