// A real OpenID provider (panva/oidc-provider) for the test suite, issuing tokens shaped like
// Keycloak's for the realm "shanoir-ng". Loopback only; every token and grant lives in memory.
//
//   node tests/idp/server.mjs --port P --jwks FILE [--opaque] [--ttl S] [--typ T]
//                             [--viewer-origin ORIGIN ...]
//   (or IDP_PORT, IDP_JWKS, IDP_OPAQUE=1, IDP_TTL, IDP_TYP, IDP_VIEWER_ORIGINS=O1,O2)
//
// FILE is a private JWKS: the first key signs, every key's public part is published.
// Each ORIGIN (http://127.0.0.1:PORT) is where a browser viewer runs: the public client
// "ohif-viewer" logs users in there with the authorization code flow and PKCE, through a login
// form at {issuer}/interaction/{uid} (users below, no consent asked, as Keycloak's own clients).
// Prints "ready" on stdout once listening; exits with 0 on SIGTERM or SIGINT.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    jwks: { type: 'string' },
    ttl: { type: 'string' },
    typ: { type: 'string' },
    opaque: { type: 'boolean' },
    'viewer-origin': { type: 'string', multiple: true },
  },
});
const env = process.env;
const PORT = Number(args.port ?? env.IDP_PORT);
const JWKS_FILE = args.jwks ?? env.IDP_JWKS;
const TTL = Number(args.ttl ?? env.IDP_TTL ?? 300);
const TYP = args.typ ?? env.IDP_TYP; // header "typ" of JWT access tokens; default at+jwt
const OPAQUE = args.opaque ?? ['1', 'true', 'yes'].includes(env.IDP_OPAQUE ?? '');
const VIEWER_ORIGINS = args['viewer-origin'] ?? (env.IDP_VIEWER_ORIGINS ?? '').split(',');
if (!Number.isInteger(PORT) || PORT <= 0 || !JWKS_FILE || !Number.isInteger(TTL) || TTL <= 0) {
  console.error('usage: server.mjs --port P --jwks FILE [--opaque] [--ttl S] [--typ T]');
  process.exit(2);
}

const REALM = '/realms/shanoir-ng';
const ISSUER = `http://127.0.0.1:${PORT}${REALM}`;
const AUDIENCE = 'dicomweb-proxy';
// Resource indicators must be absolute URIs; the audience put in tokens is the plain client id.
const RESOURCE = 'urn:shanoir:dicomweb-proxy';
const USER_SCOPE = 'openid profile email'; // Keycloak's default client scopes
const SERVICE_SCOPE = 'profile email';

// Users (password grant). Keycloak's "sub" is a UUID; Shanoir's own id is the userId claim.
const USERS = new Map(
  [
    ['alice', 'alice-pw', 1, ['ROLE_USER'], ['viewer'], 'Alice', 'Liddell'],
    ['bob', 'bob-pw', 2, ['ROLE_USER'], ['viewer'], 'Bob', 'Morane'],
    ['admin', 'admin-pw', 3, ['ROLE_ADMIN', 'ROLE_USER'], ['viewer', 'uploader'], 'Ada', 'Admin'],
  ].map(([username, password, userId, roles, clientRoles, givenName, familyName]) => [username, {
    username, password, userId, roles, clientRoles, givenName, familyName,
    sub: `00000000-0000-4000-8000-${String(userId).padStart(12, '0')}`,
  }]),
);
const SERVICE_ACCOUNT_SUB = '00000000-0000-4000-8000-000000000100';
const ACCOUNTS = new Map([...USERS.values()].map((user) => [user.sub, user]));

// Keycloak's shape: the audience of a user token also names "account" (its account console),
// and resource_access holds client roles per client.
function keycloakClaims(token) {
  const user = token.accountId && ACCOUNTS.get(token.accountId);
  const common = { typ: 'Bearer', azp: token.clientId };
  if (!user) {
    // client_credentials: Keycloak's service-account user, without a Shanoir userId.
    return {
      ...common,
      sub: SERVICE_ACCOUNT_SUB,
      aud: AUDIENCE,
      scope: token.scope || SERVICE_SCOPE,
      preferred_username: `service-account-${token.clientId}`,
      realm_access: { roles: ['default-roles-shanoir-ng'] },
      resource_access: { [AUDIENCE]: { roles: ['introspection'] } },
    };
  }
  return {
    ...common,
    sub: user.sub,
    aud: [AUDIENCE, 'account'],
    scope: token.scope || USER_SCOPE,
    userId: user.userId,
    preferred_username: user.username,
    email: `${user.username}@shanoir.example.org`,
    email_verified: true,
    name: `${user.givenName} ${user.familyName}`,
    given_name: user.givenName,
    family_name: user.familyName,
    realm_access: { roles: user.roles },
    resource_access: {
      [AUDIENCE]: { roles: user.clientRoles },
      account: { roles: ['manage-account', 'view-profile'] },
    },
  };
}

// oidc-provider writes its own aud (a single string), sub and scope *after* the claims of
// extraTokenClaims, in JWTs and in introspection answers alike: these put Keycloak's back.
const restore = (target, extra) => {
  for (const claim of ['aud', 'sub', 'scope']) target[claim] = extra[claim];
};

const resourceServer = {
  audience: AUDIENCE,
  scope: `${USER_SCOPE} roles`,
  accessTokenFormat: OPAQUE ? 'opaque' : 'jwt',
  accessTokenTTL: TTL,
  jwt: { sign: { alg: 'RS256' } }, // the first RS256 key of the keystore
};

const provider = new Provider(ISSUER, {
  jwks: JSON.parse(readFileSync(JWKS_FILE, 'utf8')),
  clients: [
    {
      client_id: 'dicomweb-proxy', // the gateway: service account + introspection
      client_secret: 'proxy-secret',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    },
    // Viewers: public clients (no secret), Resource Owner Password Credentials only.
    ...['shanoir-ng-front', 'ohif'].map((clientId) => ({
      client_id: clientId,
      grant_types: ['password'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'none',
    })),
    // A browser viewer: public client, authorization code flow (PKCE is required of public
    // clients), redirected back to {origin}/callback, OHIF's default redirect_uri.
    ...(VIEWER_ORIGINS.some(Boolean)
      ? [{
        client_id: 'ohif-viewer',
        grant_types: ['authorization_code'],
        response_types: ['code'],
        redirect_uris: VIEWER_ORIGINS.filter(Boolean).map((origin) => `${origin}/callback`),
        post_logout_redirect_uris: VIEWER_ORIGINS.filter(Boolean).map((origin) => `${origin}/`),
        token_endpoint_auth_method: 'none',
      }]
      : []),
  ],
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // The login form below, under the realm's path like every other URL of the provider.
  interactions: { url: async (ctx, interaction) => `${REALM}/interaction/${interaction.uid}` },
  // No consent screen: a logged-in user's first authorization grants what the client asks,
  // within the scopes every token may have.
  loadExistingGrant: async (ctx) => {
    const { client, session, result } = ctx.oidc;
    const grantId = result?.consent?.grantId || session.grantIdFor(client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    if (!session.accountId) return undefined;
    const { accountId } = session;
    const grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId });
    grant.addOIDCScope(USER_SCOPE);
    grant.addResourceScope(RESOURCE, resourceServer.scope);
    await grant.save();
    return grant;
  },
  // Keycloak's endpoint paths, under the issuer's path.
  routes: {
    authorization: '/protocol/openid-connect/auth',
    end_session: '/protocol/openid-connect/logout',
    introspection: '/protocol/openid-connect/token/introspect',
    jwks: '/protocol/openid-connect/certs',
    pushed_authorization_request: '/protocol/openid-connect/ext/par/request',
    revocation: '/protocol/openid-connect/revoke',
    token: '/protocol/openid-connect/token',
    userinfo: '/protocol/openid-connect/userinfo',
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'roles'],
  ttl: { AccessToken: TTL, ClientCredentials: TTL },
  clientBasedCORS: () => true,
  extraTokenClaims: async (ctx, token) => keycloakClaims(token),
  formats: {
    customizers: {
      jwt(ctx, token, jwt) {
        restore(jwt.payload, token.extra);
        if (TYP) jwt.header = { typ: TYP }; // e.g. "JWT", as Keycloak writes
      },
    },
  },
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    introspection: {
      enabled: true,
      // Only the gateway may introspect (public clients would otherwise see their own tokens).
      allowedPolicy: async (ctx, client) => client.clientId === 'dicomweb-proxy',
    },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Every token is for the gateway, whether or not the client sends resource=.
      defaultResource: async () => RESOURCE,
      // Also the code flow's, which asks for "openid" and names no resource at the token
      // endpoint (else oidc-provider issues an opaque token for its own userinfo endpoint).
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resource) => {
        if (resource !== RESOURCE) throw new errors.InvalidTarget();
        return resourceServer;
      },
    },
  },
});

const sameSecret = (a, b) => {
  const [x, y] = [Buffer.from(a), Buffer.from(b)];
  return x.length === y.length && timingSafeEqual(x, y);
};

// RFC 6749 §4.3, which oidc-provider does not ship. The token endpoint has already
// authenticated the client and checked that "password" is among its grant_types.
provider.registerGrantType('password', async (ctx) => {
  const { client, params } = ctx.oidc;
  if (!params.username || !params.password) {
    throw new errors.InvalidRequest('missing username or password');
  }
  if (params.resource !== undefined && params.resource !== RESOURCE) {
    throw new errors.InvalidTarget();
  }
  const user = USERS.get(params.username);
  if (!user || !sameSecret(user.password, params.password)) {
    // Keycloak's wording (oidc-provider's InvalidGrant would say "grant request is invalid").
    throw new errors.CustomOIDCProviderError('invalid_grant', 'Invalid user credentials');
  }
  const granted = new Set(resourceServer.scope.split(' '));
  const requested = params.scope ? params.scope.split(' ') : USER_SCOPE.split(' ');
  const token = new provider.AccessToken({
    accountId: user.sub,
    client,
    gty: 'password',
    scope: requested.filter((scope) => granted.has(scope)).join(' ') || undefined,
  });
  // Setting the resource server sets aud and selects the format (jwt or opaque) and TTL.
  token.resourceServer = new provider.ResourceServer(RESOURCE, resourceServer);
  ctx.oidc.entity('AccessToken', token);
  const value = await token.save();
  ctx.body = {
    access_token: value,
    expires_in: token.expiration,
    token_type: token.tokenType,
    scope: token.extra.scope,
    'not-before-policy': 0,
  };
}, ['username', 'password', 'scope', 'resource']);

// The introspection answer: same restoring as for JWTs (RFC 7662 for opaque tokens only;
// oidc-provider refuses to introspect its own JWTs).
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route === 'introspection' && ctx.body?.active) {
    const { AccessToken, ClientCredentials } = ctx.oidc.entities;
    restore(ctx.body, (AccessToken ?? ClientCredentials).extra);
  }
});
provider.on('server_error', (ctx, error) => console.error('server_error', error));

// The login page of the authorization code flow: a form for a username and password.
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const loginPage = (action, error) => `<!doctype html>
<html><head><meta charset="utf-8"><title>Sign in to shanoir-ng</title></head><body>
<h1>Sign in to shanoir-ng</h1>${error ? `<p id="input-error">${escapeHtml(error)}</p>` : ''}
<form method="post" action="${escapeHtml(action)}">
<label>Username <input id="username" name="username" autofocus></label>
<label>Password <input id="password" name="password" type="password"></label>
<button id="kc-login" type="submit">Sign In</button>
</form></body></html>`;

const readForm = (req) => new Promise((resolve, reject) => {
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => resolve(new URLSearchParams(body)));
  req.on('error', reject);
});

async function interaction(req, res) {
  const html = (status, text) => {
    res.writeHead(status, {
      'content-type': 'text/html; charset=utf-8',
      'cache-control': 'no-store',
    });
    res.end(text);
  };
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (error) {
    return html(400, `<p>${escapeHtml(String(error.message))}</p>`);
  }
  const action = req.url.split('?')[0];
  if (req.method !== 'POST') return html(200, loginPage(action));
  const form = await readForm(req);
  const user = USERS.get(form.get('username') ?? '');
  if (!user || !sameSecret(user.password, form.get('password') ?? '')) {
    return html(200, loginPage(action, 'Invalid username or password.')); // Keycloak's words
  }
  if (details.prompt.name !== 'login') {
    return html(400, `<p>unexpected prompt ${escapeHtml(details.prompt.name)}</p>`);
  }
  return provider.interactionFinished(req, res, { login: { accountId: user.sub } }, {
    mergeWithLastSubmission: false,
  });
}

// Mount under the issuer's path, as Keycloak does. oidc-provider routes on req.url and
// derives the mount path for the URLs it writes from req.originalUrl.
const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith(`${REALM}/interaction/`)) {
    interaction(req, res).catch((error) => {
      console.error('interaction', error);
      res.writeHead(500).end();
    });
  } else if (req.url === REALM || req.url.startsWith(`${REALM}/`)) {
    req.originalUrl = req.url;
    req.url = req.url.slice(REALM.length) || '/';
    callback(req, res);
  } else {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end('{"error":"Unable to find matching target resource method"}');
  }
});

const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(PORT, '127.0.0.1', () => console.log('ready'));
