//! The private brokers themselves: they answer on their port, stop, die and start again on the
//! same port, and leave nothing listening once dropped.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use headwater_testkit::broker::{BrokerKind, BrokerProcess};

fn answers(port: u16) -> bool {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
}

fn lifecycle(kind: BrokerKind) {
    let mut broker = BrokerProcess::unstarted(kind);
    let port = broker.port();
    assert!(!answers(port), "nothing listens before the start");
    assert!(!broker.is_running());
    let t = std::time::Instant::now();
    broker.start_again();
    eprintln!("{kind:?} start {:?}", t.elapsed());
    assert!(answers(port));
    assert!(broker.url().contains(&format!("127.0.0.1:{port}")));
    let t = std::time::Instant::now();
    broker.kill();
    eprintln!("{kind:?} kill {:?}", t.elapsed());
    assert!(!answers(port), "killed");
    assert!(!broker.is_running());
    let t = std::time::Instant::now();
    broker.start_again();
    eprintln!("{kind:?} start again {:?}", t.elapsed());
    assert!(answers(port), "started again on the same port");
    let t = std::time::Instant::now();
    broker.stop();
    eprintln!("{kind:?} stop {:?}", t.elapsed());
    assert!(!answers(port), "stopped");
    broker.start_again();
    assert!(broker.is_running());
    broker.freeze();
    let epmd_port = broker.epmd_port();
    drop(broker);
    assert!(!answers(port), "dropped");
    if let Some(epmd) = epmd_port {
        assert!(!answers(epmd), "the node's epmd outlived it");
    }
}

#[test]
fn nats_starts_stops_dies_and_starts_again() {
    lifecycle(BrokerKind::Nats);
}

#[test]
fn rabbitmq_starts_stops_dies_and_starts_again() {
    lifecycle(BrokerKind::RabbitMq);
}
