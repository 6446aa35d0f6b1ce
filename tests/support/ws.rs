//! A WebSocket client for relay tests.
#![allow(dead_code)]

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the relay said next.
#[derive(Debug, PartialEq)]
pub enum Received {
    /// A JSON text frame.
    Frame(Value),
    /// A close frame with its code.
    Closed(u16),
    /// The stream ended without a close frame.
    Ended,
}

pub struct WsClient {
    socket: Socket,
}

impl WsClient {
    /// Connects with `Authorization: Bearer <token>` (or none).
    pub async fn connect(url: &str, token: Option<&str>) -> Result<WsClient, Box<dyn std::error::Error + Send + Sync>> {
        let mut request = url.into_client_request()?;
        if let Some(token) = token {
            request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        }
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(WsClient { socket })
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.socket.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// A `send` frame.
    pub async fn send_message(
        &mut self,
        id: &str,
        to: &str,
        body: &[u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let frame =
            json!({ "v": 1, "type": "send", "id": id, "to": to, "kind": "whisper", "body": super::api::b64(body) });
        self.send_text(&frame.to_string()).await
    }

    pub async fn ack(&mut self, id: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.send_text(&json!({ "v": 1, "type": "ack", "id": id }).to_string()).await
    }

    /// The next frame or close, within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Received, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            let Some(message) = tokio::time::timeout(wait, self.socket.next()).await? else {
                return Ok(Received::Ended);
            };
            match message {
                Ok(Message::Text(text)) => return Ok(Received::Frame(serde_json::from_str(text.as_str())?)),
                Ok(Message::Close(frame)) => return Ok(Received::Closed(frame.map_or(1005, |f| u16::from(f.code)))),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Binary(_)) => return Err("unexpected binary frame".into()),
                Err(_) => return Ok(Received::Ended),
            }
        }
    }

    /// The next JSON frame (fails on a close).
    pub async fn frame(&mut self) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        match self.next(Duration::from_secs(10)).await? {
            Received::Frame(frame) => Ok(frame),
            other => Err(format!("expected a frame, got {other:?}").into()),
        }
    }

    /// Closes the connection (normal closure) and waits for the server's answer.
    pub async fn close(&mut self) {
        let _ = self.socket.close(None).await;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while self.socket.next().await.is_some() {} }).await;
    }

    /// Nothing arrives within `wait`.
    pub async fn quiet(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.socket.next()).await.is_err()
    }
}
