//! The `:443` handler. Until the forwarding layer lands, it answers the health path (an
//! ALB's HTTPS health check uses it) and 503 for everything else.

use hyper::body::Incoming;
use http::{Response, StatusCode};

use crate::health::Health;
use crate::server::{ConnInfo, Handler};
use crate::{text_response, Body};

pub struct Https {
    pub health_path: String,
    pub health: Health,
}

impl Handler for Https {
    async fn handle(&self, req: http::Request<Incoming>, _conn: &ConnInfo) -> Response<Body> {
        if req.uri().path() == self.health_path {
            return self.health.response();
        }
        text_response(StatusCode::SERVICE_UNAVAILABLE, "no app is serving yet")
    }
}
