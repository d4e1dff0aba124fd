//! The broker flags of a service: `--amqp URL` or `--nats URL`, or neither (the HTTP feed only).

use std::sync::Arc;

use crate::{AmqpBroker, Broker, BrokerError, NatsBroker};

/// Where a service publishes its feeds. Flatten it into a service's clap arguments:
///
/// ```
/// #[derive(clap::Parser)]
/// struct Service {
///     #[command(flatten)]
///     broker: headwater_publish::BrokerArgs,
/// }
/// ```
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
#[group(multiple = false)]
#[non_exhaustive]
pub struct BrokerArgs {
    /// Publish the feeds to RabbitMQ at this URL (amqp://user:password@host:5672/vhost). Without
    /// --amqp or --nats the feeds are served over HTTP only.
    #[arg(
        long,
        value_name = "URL",
        env = "HEADWATER_AMQP_URL",
        hide_env_values = true
    )]
    pub amqp: Option<String>,
    /// Publish the feeds to NATS JetStream at this URL (nats://host:4222).
    #[arg(
        long,
        value_name = "URL",
        env = "HEADWATER_NATS_URL",
        hide_env_values = true
    )]
    pub nats: Option<String>,
}

impl BrokerArgs {
    /// The broker the flags name, connecting lazily (a broker that is down at start delays
    /// publishing, never the service), or `None` for neither flag.
    ///
    /// # Errors
    /// [`BrokerError::Url`] for a URL that is not valid; [`BrokerError::Connect`] if the NATS
    /// client cannot even be set up.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn broker(&self) -> Result<Option<Arc<dyn Broker>>, BrokerError> {
        match (&self.amqp, &self.nats) {
            (Some(url), _) => Ok(Some(Arc::new(AmqpBroker::lazy(url)?))),
            (None, Some(url)) => Ok(Some(Arc::new(NatsBroker::lazy(url).await?))),
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::BrokerArgs;

    #[derive(clap::Parser, Debug)]
    struct Service {
        #[command(flatten)]
        broker: BrokerArgs,
    }

    #[test]
    fn one_broker_or_none() {
        let none = Service::try_parse_from(["service"]).unwrap();
        assert_eq!(none.broker, BrokerArgs::default());
        let amqp = Service::try_parse_from(["service", "--amqp", "amqp://localhost"]).unwrap();
        assert_eq!(amqp.broker.amqp.as_deref(), Some("amqp://localhost"));
        let both = Service::try_parse_from([
            "service",
            "--amqp",
            "amqp://localhost",
            "--nats",
            "nats://localhost",
        ]);
        assert!(both.is_err(), "--amqp and --nats together are refused");
    }

    #[tokio::test]
    async fn bad_urls_are_refused_before_any_connection() {
        for (amqp, nats) in [
            (Some("http://localhost"), None),
            (Some("amqp://user:pw@[::1"), None),
            (None, Some("amqp://localhost")),
        ] {
            let args = BrokerArgs {
                amqp: amqp.map(str::to_owned),
                nats: nats.map(str::to_owned),
            };
            let error = args.broker().await.map(|_| ()).expect_err("a bad URL");
            assert!(
                matches!(error, crate::BrokerError::Url(_)),
                "{amqp:?} {nats:?}: {error}"
            );
            assert!(!error.to_string().contains("pw"), "{error}");
        }
    }
}
