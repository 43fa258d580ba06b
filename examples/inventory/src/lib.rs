//! The retail reference application, written against the public SDK only.
//!
//! A regional retail chain. Warehouses send product updates, checkout counters send
//! basket events, and each region runs these functions:
//!
//! * **product-intake** (stateless, `warehouse-updates`, [`intake`]): validates the
//!   product, processes its image through an object store, forwards it to inventory.
//!   Invalid records go to the dead-letter egress `retail/rejected` with the reason.
//! * **inventory** (id = SKU): product record, on hand, reserved; never negative.
//!   Answers reservations with the price and offer, emits low-stock alerts, and sums
//!   sales and deliveries into per-SKU windows for central analytics.
//! * **cart** (id = basket, `pos-events`): the multi-item transaction as a saga. Each
//!   scanned item is reserved at the inventory. Checkout commits the reservations with
//!   multi-buy and code promotions applied. Cancel, removal or an abandon timer (a
//!   delayed message, cancelled on checkout) releases them. Counter events carry a
//!   sequence number: duplicates are dropped and early events wait for the gap.
//! * **loyalty** (id = customer): points per euro by tier, purchase history and a
//!   recommendation; each basket is credited once.
//!
//! Egress, central analytics: `retail/orders` ([`OrderSummary`]) and
//! `retail/sku-windows` ([`SkuWindow`]), only what must cross the region's boundary.
//! Regional: `retail/alerts` ([`LowStock`]) and `retail/rejected` ([`Rejected`]).
//! [`generator`] simulates regions, [`check`] verifies the business invariants and
//! [`analytics`] is the central consumer's global view. [`region`] runs a region
//! in-process or on Kafka; [`kafka`] has the Kafka deployment (topics, instances in
//! cluster mode, the generator's producer, the analytics consumer, the state read back
//! from the changelog).

use std::sync::Arc;
use std::time::Duration;

use statefun_sdk::prelude::*;

pub mod analytics;
pub mod check;
pub mod functions;
pub mod generator;
pub mod intake;
pub mod kafka;
pub mod region;
pub mod types;

pub use functions::{ACCOUNT, BASKET, PRODUCT, STOCK, WINDOW};
pub use intake::ProductIntake;
pub use types::*;

/// Function type: product-intake.
pub const INTAKE: TypeName = TypeName::from_static("retail/product-intake");
/// Function type: inventory.
pub const INVENTORY: TypeName = TypeName::from_static("retail/inventory");
/// Function type: cart.
pub const CART: TypeName = TypeName::from_static("retail/cart");
/// Function type: loyalty.
pub const LOYALTY: TypeName = TypeName::from_static("retail/loyalty");
/// Egress of completed orders (central analytics).
pub const ORDERS: TypeName = TypeName::from_static("retail/orders");
/// Egress of per-SKU windows (central analytics).
pub const SKU_WINDOWS: TypeName = TypeName::from_static("retail/sku-windows");
/// Egress of low-stock alerts (regional).
pub const ALERTS: TypeName = TypeName::from_static("retail/alerts");
/// The application's dead-letter egress: refused records with the reason (regional).
pub const REJECTED: TypeName = TypeName::from_static("retail/rejected");

/// Settings of one region's functions.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The region's name, carried by the analytics records.
    pub region: String,
    /// An open basket with no counter event for this long is abandoned.
    pub abandon_after: Duration,
    /// Length of the per-SKU analytics windows.
    pub window: Duration,
    /// Where the cart function runs: `None` embedded in the runtime, or a remote
    /// process serving [`cart_module`] (`inventory-node cart-server`).
    pub remote_cart: Option<RemoteCart>,
}

/// The cart function served by another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCart {
    /// `http://host:port/path` (StateFun's HTTP protocol) or `http://host:port` (gRPC).
    pub url: String,
    /// How it is reached.
    pub transport: RemoteTransport,
}

/// How a remote function is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RemoteTransport {
    /// StateFun's request-reply protocol over HTTP.
    Http,
    /// statefun-rs's gRPC service.
    Grpc,
}

/// The command-line flags that place the cart (shared by the example's binaries).
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteCartArgs {
    /// Run the cart as a remote function served at this URL by `inventory-node
    /// cart-server` (HTTP: `http://HOST:PORT/statefun`; gRPC: `http://HOST:PORT`).
    /// Without it, the cart runs embedded.
    #[arg(long)]
    pub remote_cart: Option<String>,
    /// How the remote cart is reached.
    #[arg(long, value_enum, default_value_t = RemoteTransport::Http)]
    pub remote_cart_transport: RemoteTransport,
}

impl RemoteCartArgs {
    /// The placement the flags ask for.
    pub fn remote_cart(&self) -> Option<RemoteCart> {
        self.remote_cart.as_ref().map(|url| RemoteCart {
            url: url.clone(),
            transport: self.remote_cart_transport,
        })
    }
}

impl RemoteCart {
    /// The function the runtime registers for the cart: it declares no state (the cart
    /// names its basket in the state handshake).
    pub fn function(&self) -> anyhow::Result<Arc<dyn StatefulFunction>> {
        let options = statefun_remote::RemoteOptions {
            // A cart that stays unreachable this long is parked (after the runtime's
            // retries), its messages dead-lettered.
            call_timeout: Duration::from_secs(10),
            ..Default::default()
        };
        Ok(match self.transport {
            RemoteTransport::Http => Arc::new(statefun_remote::HttpTransport::new(options)?.function(&self.url)?),
            RemoteTransport::Grpc => Arc::new(statefun_remote::GrpcTransport::new(&self.url, options)?.function()),
        })
    }
}

impl AppConfig {
    /// Defaults for `region`: abandon after 1.5 s, 2 s windows (a demo's time scale).
    pub fn new(region: impl Into<String>) -> AppConfig {
        AppConfig {
            region: region.into(),
            abandon_after: functions::DEFAULT_ABANDON_AFTER,
            window: Duration::from_secs(2),
            remote_cart: None,
        }
    }
}

/// The region's functions; product images live in `store`. The cart is embedded, or
/// reached remotely when `config.remote_cart` says so.
pub fn module(config: AppConfig, store: Arc<dyn object_store::ObjectStore>) -> anyhow::Result<Module> {
    let c1 = config.clone();
    let functions = Module::builder()
        .with_function(ProductIntake::spec(), ProductIntake::new(store))
        .with_fn(
            FunctionSpec::new(INVENTORY)
                .with_state(STOCK)
                .with_state(PRODUCT)
                .with_state(WINDOW),
            move |ctx, msg| functions::inventory(ctx, msg, &c1),
        )
        .with_fn(FunctionSpec::new(LOYALTY).with_state(ACCOUNT), functions::loyalty)
        .build()?;
    let cart = match &config.remote_cart {
        None => cart_module(config)?,
        Some(remote) => Module::builder()
            .with_shared_function(FunctionSpec::new(CART), remote.function()?)
            .build()?,
    };
    Ok(functions.merge(cart)?)
}

/// The cart function alone, as the runtime embeds it and as a remote process serves it
/// (`inventory-node cart-server`): the same code either way.
pub fn cart_module(config: AppConfig) -> Result<Module, statefun_sdk::ModuleError> {
    Module::builder()
        .with_fn(FunctionSpec::new(CART).with_state(BASKET), move |ctx, msg| {
            functions::cart(ctx, msg, &config)
        })
        .build()
}
